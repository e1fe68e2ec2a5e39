// Fixture process for snaptier's CRIU image parser tests: one 8-page anonymous mapping at a
// fixed address with pages 0,1,2 and 6 filled with a known pattern, the rest untouched.
// With an argument it forks once; the child then also fills page 3 with 0xC3.
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
  (void)argv;
  uint8_t *p = mmap((void *)0x10000000, 8 * 4096, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (p == MAP_FAILED) return 1;
  int pages[] = {0, 1, 2, 6};
  for (int i = 0; i < 4; i++) memset(p + pages[i] * 4096, 0xA0 + pages[i], 4096);
  if (argc > 1 && fork() == 0) memset(p + 3 * 4096, 0xC3, 4096);
  for (;;) pause();
}
