/* memops: a native function that does to its memory what processes do to theirs, and checks
 * every byte against what the kernel's semantics for *anonymous* memory say.
 *
 *     memops --socket PATH --ready PATH [--log PATH] [--config JSON] [--max-frame-bytes N]
 *
 * A restore may turn any of these ranges into a private file mapping of the CXL region (the
 * agent's in-place path); the process cannot tell, so each invocation re-does, on every range:
 *
 *   ro         built at init, only read afterwards
 *   sealed     built at init, then mprotect(PROT_READ)
 *   written    scratch: holds the pattern the last invocation wrote (init's after init or a
 *              restore), overwritten with the next one, read; not part of the digest
 *   discarded  read, MADV_DONTNEED (must read zeros: a file mapping would give the snapshot's
 *              bytes back), refilled, read
 *   moved      mremap'd to a spare slot and back (MREMAP_FIXED), read at each place
 *   grown      mremap'd to twice its size (MREMAP_MAYMOVE: moves, since a guard page follows);
 *              the old part keeps its bytes, the new part must read zeros (a file mapping
 *              would show the file's next pages); written, shrunk back, moved home
 *   unmapped   its middle half munmap'd and mapped again anonymously (zeros), refilled
 *   zero       never written: zeros
 *   cold       built at init, never touched by an invocation (only by the digest op)
 *
 * and forks a child that checks the same bytes in its own copy, writes and discards there
 * (copy-on-write: the parent must not see it) and reports through a pipe. The first wrong byte
 * fails the invocation with the range, offset, value and expectation. Invocations leave every
 * range but `written` as init() built it; the `digest` op hashes them all, the output's
 * `checked_sha256` those an invocation touches (all but `cold`, which stays cold for a profile).
 *
 * Protocol, readiness and the CRIU rules: docs/functions.md. One thread, one connection at a
 * time, nothing open at dump time but the listening socket and /dev/null. Linked statically
 * (workloads/memops/CMakeLists.txt): the snapshot maps no shared library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

#define FUNCTION_NAME "memops"
#define PAGE 4096u
#define DEFAULT_MAX_FRAME (16u << 20)
#define IDLE_TIMEOUT_MS 30000

/* ---- ranges ---------------------------------------------------------------------------------- */

enum { R_RO, R_SEALED, R_WRITTEN, R_DISCARDED, R_MOVED, R_GROWN, R_UNMAPPED, R_ZERO, R_COLD, R_COUNT };
static const char *const range_names[R_COUNT] = {"ro", "sealed", "written", "discarded", "moved",
                                                 "grown", "unmapped", "zero", "cold"};

struct range {
    uint8_t *base;
    size_t bytes;
};
static struct range ranges[R_COUNT];
static uint8_t *spare_slot; /* where `moved` goes and comes back from */
static uint64_t seed = 1;
static uint64_t written_variant; /* the pattern `written` holds (0: init's) */
static size_t ro_pages = 1024, range_pages = 64;

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The 64-bit word at byte offset 8*i of range r, for pattern `variant` (0: what init builds). */
static uint64_t word_of(int r, size_t i, uint64_t variant) {
    return splitmix64((seed << 48) ^ ((uint64_t)r << 40) ^ (variant << 32) ^ i);
}

static void fill(int r, uint8_t *base, size_t from, size_t to, uint64_t variant) {
    uint64_t *w = (uint64_t *)base;
    for (size_t i = from / 8; i < to / 8; ++i) w[i] = word_of(r, i, variant);
}

/* The problem of the current invocation (first wrong byte, or a failed call), if any. */
static char problem[512];

static bool failf(const char *format, ...) {
    if (problem[0] == '\0') {
        va_list args;
        va_start(args, format);
        vsnprintf(problem, sizeof problem, format, args);
        va_end(args);
    }
    return false;
}

static uint64_t checked_bytes;

/* Every byte of [from, to) of range r at `base` equals pattern `variant` (zero_variant: zeros). */
#define ZEROS UINT64_MAX
static bool check(int r, const uint8_t *base, size_t from, size_t to, uint64_t variant, const char *when) {
    const uint64_t *w = (const uint64_t *)base;
    for (size_t i = from / 8; i < to / 8; ++i) {
        const uint64_t want = variant == ZEROS ? 0 : word_of(r, i, variant);
        if (w[i] == want) continue;
        for (unsigned b = 0; b < 8; ++b) {
            const uint8_t got = (uint8_t)(w[i] >> (8 * b)), expected = (uint8_t)(want >> (8 * b));
            if (got == expected) continue;
            const size_t offset = i * 8 + b;
            return failf("range %s %s: byte %zu (page %zu) is 0x%02x, expected 0x%02x (%s)", range_names[r], when,
                         offset, offset / PAGE, got, expected,
                         variant == ZEROS ? "zeros" : variant == 0 ? "the bytes init() wrote" : "the bytes written last");
        }
    }
    checked_bytes += to - from;
    return true;
}

static bool check_all(const char *when) {
    for (int r = 0; r < R_COUNT; ++r) {
        if (r == R_COLD) continue;
        const uint64_t variant = r == R_ZERO ? ZEROS : r == R_WRITTEN ? written_variant : 0;
        if (!check(r, ranges[r].base, 0, ranges[r].bytes, variant, when)) return false;
    }
    return true;
}

static uint8_t *map_anonymous(void *at, size_t bytes, int prot) {
    void *p = mmap(at, bytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED_NOREPLACE : 0), -1, 0);
    if (p == MAP_FAILED) return NULL;
    if (at && p != at) {
        munmap(p, bytes);
        errno = EEXIST;
        return NULL;
    }
    return p;
}

/* Each range is its own VMA: a PROT_NONE guard page after it keeps the kernel from merging it
 * with its neighbour and makes `grown` move when it grows. */
static bool build_ranges(void) {
    for (int r = 0; r < R_COUNT; ++r) {
        const size_t bytes = (r == R_RO ? ro_pages : range_pages) * PAGE;
        uint8_t *p = map_anonymous(NULL, bytes + PAGE, PROT_NONE);
        if (!p || mprotect(p, bytes, PROT_READ | PROT_WRITE) != 0) return failf("mmap %s: %s", range_names[r], strerror(errno));
        ranges[r] = (struct range){p, bytes};
        if (r != R_ZERO) fill(r, p, 0, bytes, 0);
    }
    if (mprotect(ranges[R_SEALED].base, ranges[R_SEALED].bytes, PROT_READ) != 0)
        return failf("mprotect sealed: %s", strerror(errno));
    spare_slot = map_anonymous(NULL, ranges[R_MOVED].bytes + PAGE, PROT_NONE);
    if (!spare_slot) return failf("mmap spare slot: %s", strerror(errno));
    return true;
}

/* ---- one invocation -------------------------------------------------------------------------- */

static uint64_t invocations, failed_invocations;

/* Left holding new bytes, so a profile sees these pages written (they differ from the snapshot). */
static bool do_written(uint64_t variant) {
    struct range *w = &ranges[R_WRITTEN];
    if (!check(R_WRITTEN, w->base, 0, w->bytes, written_variant, "before writing")) return false;
    fill(R_WRITTEN, w->base, 0, w->bytes, variant);
    written_variant = variant;
    return check(R_WRITTEN, w->base, 0, w->bytes, variant, "after writing");
}

static bool do_discarded(void) {
    struct range *d = &ranges[R_DISCARDED];
    if (!check(R_DISCARDED, d->base, 0, d->bytes, 0, "before MADV_DONTNEED")) return false;
    if (madvise(d->base, d->bytes, MADV_DONTNEED) != 0) return failf("madvise(MADV_DONTNEED): %s", strerror(errno));
    if (!check(R_DISCARDED, d->base, 0, d->bytes, ZEROS, "after MADV_DONTNEED")) return false;
    fill(R_DISCARDED, d->base, 0, d->bytes, 0);
    return check(R_DISCARDED, d->base, 0, d->bytes, 0, "after refilling");
}

static bool do_moved(void) {
    struct range *m = &ranges[R_MOVED];
    uint8_t *home = m->base;
    /* MREMAP_FIXED replaces the spare slot's PROT_NONE reservation; home is then free. */
    void *away = mremap(home, m->bytes, m->bytes, MREMAP_MAYMOVE | MREMAP_FIXED, spare_slot);
    if (away == MAP_FAILED) return failf("mremap moved away: %s", strerror(errno));
    if (!check(R_MOVED, away, 0, m->bytes, 0, "after mremap away")) return false;
    void *back = mremap(away, m->bytes, m->bytes, MREMAP_MAYMOVE | MREMAP_FIXED, home);
    if (back == MAP_FAILED) return failf("mremap moved back: %s", strerror(errno));
    if (!map_anonymous(spare_slot, m->bytes, PROT_NONE)) return failf("mmap spare slot again: %s", strerror(errno));
    return check(R_MOVED, home, 0, m->bytes, 0, "after mremap back");
}

static bool do_grown(void) {
    struct range *g = &ranges[R_GROWN];
    uint8_t *home = g->base;
    const size_t size = g->bytes;
    uint8_t *big = mremap(home, size, 2 * size, MREMAP_MAYMOVE);
    if (big == MAP_FAILED) return failf("mremap grow: %s", strerror(errno));
    bool ok = check(R_GROWN, big, 0, size, 0, "after mremap growth (old part)") &&
              check(R_GROWN, big, size, 2 * size, ZEROS, "after mremap growth (new part)");
    if (ok) {
        memset(big + size, 0xA5, size);
        if (big[2 * size - 1] != 0xA5) ok = failf("range grown: a write into the new part did not stick");
    }
    if (mremap(big, 2 * size, size, 0) == MAP_FAILED) return failf("mremap shrink: %s", strerror(errno));
    if (big != home && mremap(big, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, home) == MAP_FAILED)
        return failf("mremap grown home: %s", strerror(errno));
    return ok && check(R_GROWN, home, 0, size, 0, "back home");
}

static bool do_unmapped(void) {
    struct range *u = &ranges[R_UNMAPPED];
    const size_t quarter = u->bytes / 4 / PAGE * PAGE, hole = u->bytes / 2 / PAGE * PAGE;
    uint8_t *gap = u->base + quarter;
    if (munmap(gap, hole) != 0) return failf("munmap: %s", strerror(errno));
    if (!check(R_UNMAPPED, u->base, 0, quarter, 0, "below the hole") ||
        !check(R_UNMAPPED, u->base, quarter + hole, u->bytes, 0, "above the hole"))
        return false;
    if (!map_anonymous(gap, hole, PROT_READ | PROT_WRITE)) return failf("mmap into the hole: %s", strerror(errno));
    if (!check(R_UNMAPPED, u->base, quarter, quarter + hole, ZEROS, "remapped")) return false;
    fill(R_UNMAPPED, u->base, quarter, quarter + hole, 0);
    return check(R_UNMAPPED, u->base, 0, u->bytes, 0, "after refilling");
}

/* The child's view: the same bytes; its writes and discards stay its own. Reports on `fd`. */
static void forked_child(int fd, uint64_t variant) {
    struct range *w = &ranges[R_WRITTEN], *d = &ranges[R_DISCARDED];
    bool ok = check_all("in the forked child");
    if (ok) {
        fill(R_WRITTEN, w->base, 0, w->bytes, variant);
        ok = check(R_WRITTEN, w->base, 0, w->bytes, variant, "after the child wrote");
    }
    if (ok) {
        if (madvise(d->base, d->bytes, MADV_DONTNEED) != 0) ok = failf("child madvise: %s", strerror(errno));
        else ok = check(R_DISCARDED, d->base, 0, d->bytes, ZEROS, "after the child's MADV_DONTNEED");
    }
    const char *report = ok ? "ok" : problem;
    ssize_t unused = write(fd, report, strlen(report));
    (void)unused;
    _exit(ok ? 0 : 1);
}

static bool do_fork(uint64_t variant) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return failf("pipe: %s", strerror(errno));
    const pid_t child = fork();
    if (child < 0) {
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        return failf("fork: %s", strerror(errno));
    }
    if (child == 0) {
        close(pipe_fds[0]);
        problem[0] = '\0';
        forked_child(pipe_fds[1], variant);
    }
    close(pipe_fds[1]);
    char report[sizeof problem] = "";
    size_t got = 0;
    for (;;) {
        struct pollfd p = {pipe_fds[0], POLLIN, 0};
        if (poll(&p, 1, 10000) <= 0) break; /* a child stuck for 10 s is killed below */
        ssize_t n = read(pipe_fds[0], report + got, sizeof report - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
        if (got == sizeof report - 1) break;
    }
    report[got] = '\0';
    close(pipe_fds[0]);
    kill(child, SIGKILL);
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    if (strcmp(report, "ok") != 0) return failf("forked child: %s", report[0] ? report : "died without a report");
    /* The child's write and discard were copy-on-write: the parent's bytes are its own. */
    return check(R_WRITTEN, ranges[R_WRITTEN].base, 0, ranges[R_WRITTEN].bytes, written_variant,
                 "after the child wrote its copy") &&
           check(R_DISCARDED, ranges[R_DISCARDED].base, 0, ranges[R_DISCARDED].bytes, 0, "after the child discarded its copy");
}

/* SHA-256 over every range but `written` (and but `cold` unless with_cold), in order. */
static void state_digest(char hex[65], uint64_t *state_bytes, bool with_cold) {
    struct sha256 h;
    sha256_init(&h);
    *state_bytes = 0;
    for (int r = 0; r < R_COUNT; ++r) {
        if (r == R_WRITTEN || (r == R_COLD && !with_cold)) continue;
        sha256_update(&h, ranges[r].base, ranges[r].bytes);
        *state_bytes += ranges[r].bytes;
    }
    uint8_t out[32];
    sha256_final(&h, out);
    for (int i = 0; i < 32; ++i) snprintf(hex + 2 * i, 3, "%02x", out[i]);
}

/* ---- JSON (just enough: validate a request, find top-level members, write replies) ----------- */

struct text {
    char *data;
    size_t size, capacity;
};

static void put(struct text *t, const char *s, size_t n) {
    if (t->size + n + 1 > t->capacity) {
        size_t cap = t->capacity ? t->capacity : 256;
        while (t->size + n + 1 > cap) cap *= 2;
        char *grown = realloc(t->data, cap);
        if (!grown) abort(); /* a reply is a few hundred bytes */
        t->data = grown;
        t->capacity = cap;
    }
    memcpy(t->data + t->size, s, n);
    t->size += n;
    t->data[t->size] = '\0';
}
static void puts_(struct text *t, const char *s) { put(t, s, strlen(s)); }
static void printf_(struct text *t, const char *format, ...) {
    char buf[1024];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(buf, sizeof buf, format, args);
    va_end(args);
    put(t, buf, n < 0 ? 0 : (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}
static void put_string(struct text *t, const char *s) {
    puts_(t, "\"");
    for (const unsigned char *c = (const unsigned char *)s; *c; ++c) {
        if (*c == '"' || *c == '\\') printf_(t, "\\%c", *c);
        else if (*c < 0x20) printf_(t, "\\u%04x", *c);
        else put(t, (const char *)c, 1);
    }
    puts_(t, "\"");
}

struct parser {
    const char *p, *end;
    int depth;
};

static void skip_ws(struct parser *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) ++s->p;
}
static bool literal(struct parser *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return false;
    s->p += n;
    return true;
}
static bool skip_string(struct parser *s) {
    if (s->p >= s->end || *s->p != '"') return false;
    for (++s->p; s->p < s->end; ++s->p) {
        const unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            ++s->p;
            return true;
        }
        if (c < 0x20) return false;
        if (c == '\\') {
            if (++s->p >= s->end) return false;
            if (*s->p == 'u') {
                for (int k = 0; k < 4; ++k) {
                    if (++s->p >= s->end || !strchr("0123456789abcdefABCDEF", *s->p)) return false;
                }
            } else if (!strchr("\"\\/bfnrt", *s->p)) {
                return false;
            }
        }
    }
    return false;
}
static bool digits(struct parser *s) {
    const char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') ++s->p;
    return s->p > start;
}
static bool skip_value(struct parser *s);
static bool skip_number(struct parser *s) {
    if (s->p < s->end && *s->p == '-') ++s->p;
    if (s->p < s->end && *s->p == '0') ++s->p;
    else if (!digits(s)) return false;
    if (s->p < s->end && *s->p == '.') {
        ++s->p;
        if (!digits(s)) return false;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        ++s->p;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) ++s->p;
        if (!digits(s)) return false;
    }
    return true;
}
static bool skip_container(struct parser *s, char close, bool object) {
    if (++s->depth > 64) return false;
    ++s->p;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        ++s->p;
        --s->depth;
        return true;
    }
    for (;;) {
        skip_ws(s);
        if (object) {
            if (!skip_string(s)) return false;
            skip_ws(s);
            if (s->p >= s->end || *s->p++ != ':') return false;
            skip_ws(s);
        }
        if (!skip_value(s)) return false;
        skip_ws(s);
        if (s->p >= s->end) return false;
        if (*s->p == ',') {
            ++s->p;
            continue;
        }
        if (*s->p++ != close) return false;
        --s->depth;
        return true;
    }
}
static bool skip_value(struct parser *s) {
    skip_ws(s);
    if (s->p >= s->end) return false;
    switch (*s->p) {
        case '{': return skip_container(s, '}', true);
        case '[': return skip_container(s, ']', false);
        case '"': return skip_string(s);
        case 't': return literal(s, "true");
        case 'f': return literal(s, "false");
        case 'n': return literal(s, "null");
        default: return skip_number(s);
    }
}

static bool valid_utf8(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n;) {
        const unsigned char c = p[i];
        size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (len == 0 || i + len > n || (len == 2 && c < 0xC2) || (len == 4 && c > 0xF4)) return false;
        for (size_t k = 1; k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return false;
        }
        if (len == 3 && ((c == 0xE0 && p[i + 1] < 0xA0) || (c == 0xED && p[i + 1] >= 0xA0))) return false;
        if (len == 4 && ((c == 0xF0 && p[i + 1] < 0x90) || (c == 0xF4 && p[i + 1] >= 0x90))) return false;
        i += len;
    }
    return true;
}

struct span {
    const char *p;
    size_t n; /* 0: absent */
};
struct request {
    struct span id, op, input;
};

/* NULL if `payload` is a JSON object (members found), else the sentence why not. */
static const char *parse_request(const char *payload, size_t n, struct request *out) {
    memset(out, 0, sizeof *out);
    if (!valid_utf8((const unsigned char *)payload, n)) return "frame is not UTF-8";
    struct parser s = {payload, payload + n, 0};
    skip_ws(&s);
    const char *start = s.p;
    if (!skip_value(&s)) return "frame is not JSON";
    skip_ws(&s);
    if (s.p != s.end) return "frame is not JSON: extra data after the value";
    if (*start != '{') return "message must be a JSON object";
    s.p = start + 1;
    skip_ws(&s);
    while (s.p < s.end && *s.p != '}') {
        const char *key = s.p;
        skip_string(&s);
        const size_t key_len = (size_t)(s.p - key);
        skip_ws(&s);
        ++s.p; /* ':' */
        skip_ws(&s);
        const char *value = s.p;
        skip_value(&s);
        const struct span member = {value, (size_t)(s.p - value)};
        if (key_len == 4 && memcmp(key, "\"id\"", 4) == 0) out->id = member;
        else if (key_len == 4 && memcmp(key, "\"op\"", 4) == 0) out->op = member;
        else if (key_len == 7 && memcmp(key, "\"input\"", 7) == 0) out->input = member;
        skip_ws(&s);
        if (s.p < s.end && *s.p == ',') ++s.p;
        skip_ws(&s);
    }
    return NULL;
}

/* ---- the server ------------------------------------------------------------------------------ */

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1000.0 + (double)t.tv_nsec / 1e6;
}

static double init_ms;
static volatile sig_atomic_t stopping;

static long pid_seen_from_proc(void) {
    char buf[32];
    ssize_t n = readlink("/proc/self", buf, sizeof buf - 1);
    if (n <= 0) return (long)getpid();
    buf[n] = '\0';
    return strtol(buf, NULL, 10);
}

static uint64_t rss_bytes(void) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return 0;
    char line[256];
    uint64_t kib = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "VmRSS: %" SCNu64, &kib) == 1) break;
    }
    fclose(f);
    return kib * 1024;
}

static void reply_start(struct text *t, const struct span *id) {
    puts_(t, "{\"id\":");
    if (id && id->n) put(t, id->p, id->n);
    else puts_(t, "null");
}
static void reply_error(struct text *t, const struct span *id, const char *message) {
    reply_start(t, id);
    puts_(t, ",\"ok\":false,\"error\":");
    put_string(t, message);
    puts_(t, "}");
}

static void invoke(struct text *t, const struct request *req) {
    const double started = now_ms();
    problem[0] = '\0';
    checked_bytes = 0;
    ++invocations;
    const uint64_t variant = 1 + invocations % 0xFFFE, child_variant = 0xFFFF;
    bool ok = check_all("at the start") && do_written(variant) && do_discarded() && do_moved() && do_grown() &&
              do_unmapped() && do_fork(child_variant) && check_all("at the end");
    if (!ok) {
        ++failed_invocations;
        reply_error(t, &req->id, problem);
        return;
    }
    char hex[65];
    uint64_t hashed_bytes = 0;
    state_digest(hex, &hashed_bytes, false);
    reply_start(t, &req->id);
    printf_(t, ",\"ok\":true,\"output\":{\"checked_bytes\":%" PRIu64 ",\"checked_sha256\":\"%s\",\"hashed_bytes\":%" PRIu64
               ",\"fork\":\"ok\",\"ranges\":[",
            checked_bytes, hex, hashed_bytes);
    for (int r = 0; r < R_COUNT; ++r) printf_(t, "%s\"%s\"", r ? "," : "", range_names[r]);
    printf_(t, "]},\"duration_ms\":%.3f}", now_ms() - started);
}

static void handle(struct text *t, const char *payload, size_t n) {
    struct request req;
    const char *bad = parse_request(payload, n, &req);
    if (bad) {
        reply_error(t, NULL, bad);
        return;
    }
    if (req.op.n) {
        const char *known = "ping, digest, stats";
        char name[64] = "";
        if (req.op.n >= 2 && req.op.p[0] == '"' && req.op.n - 2 < sizeof name) {
            memcpy(name, req.op.p + 1, req.op.n - 2);
            name[req.op.n - 2] = '\0';
        }
        if (strcmp(name, "ping") == 0) {
            reply_start(t, &req.id);
            puts_(t, ",\"ok\":true,\"output\":{\"function\":\"" FUNCTION_NAME "\"}}");
        } else if (strcmp(name, "digest") == 0) {
            char hex[65];
            uint64_t state_bytes = 0;
            state_digest(hex, &state_bytes, true);
            reply_start(t, &req.id);
            printf_(t, ",\"ok\":true,\"output\":{\"sha256\":\"%s\",\"state_bytes\":%" PRIu64 "}}", hex, state_bytes);
        } else if (strcmp(name, "stats") == 0) {
            reply_start(t, &req.id);
            printf_(t, ",\"ok\":true,\"output\":{\"function\":\"" FUNCTION_NAME "\",\"pid\":%ld,\"ns_pid\":%ld,"
                       "\"rss_bytes\":%" PRIu64 ",\"init_ms\":%.3f,\"invocations\":%" PRIu64
                       ",\"failed_invocations\":%" PRIu64 ",\"ranges\":{",
                    pid_seen_from_proc(), (long)getpid(), rss_bytes(), init_ms, invocations, failed_invocations);
            for (int r = 0; r < R_COUNT; ++r)
                printf_(t, "%s\"%s\":[%" PRIuPTR ",%zu]", r ? "," : "", range_names[r], (uintptr_t)ranges[r].base,
                        ranges[r].bytes);
            puts_(t, "}}}");
        } else {
            char message[160];
            snprintf(message, sizeof message, "unknown op %.*s (known: %s)", (int)(req.op.n > 80 ? 80 : req.op.n),
                     req.op.p, known);
            for (char *c = message; *c; ++c) {
                if (*c == '"') *c = '\'';
            }
            reply_error(t, &req.id, message);
        }
        return;
    }
    if (!req.input.n || req.input.p[0] != '{') {
        reply_error(t, &req.id, "a request needs \"input\" (an object) or \"op\"");
        return;
    }
    invoke(t, &req);
}

/* Reads exactly n bytes; 1 done, 0 clean EOF before any byte, -1 cut, error or idle. */
static int read_exact(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        struct pollfd p = {fd, POLLIN, 0};
        int ready = poll(&p, 1, IDLE_TIMEOUT_MS);
        if (ready < 0 && errno == EINTR) {
            if (stopping) return -1;
            continue;
        }
        if (ready <= 0) return -1;
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return got == 0 && r == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

static bool write_all(int fd, const void *buf, size_t n) {
    for (size_t done = 0; done < n;) {
        ssize_t w = send(fd, (const char *)buf + done, n - done, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        done += (size_t)w;
    }
    return true;
}

static bool send_frame(int fd, const struct text *t) {
    const uint32_t n = (uint32_t)t->size;
    const uint8_t header[4] = {(uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n};
    return write_all(fd, header, 4) && write_all(fd, t->data, t->size);
}

static void serve_connection(int fd, uint32_t max_frame) {
    for (;;) {
        uint8_t header[4];
        if (read_exact(fd, header, 4) != 1) return;
        const uint32_t n = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 | (uint32_t)header[2] << 8 | header[3];
        struct text reply = {0};
        if (n > max_frame) {
            char message[160];
            snprintf(message, sizeof message, "frame of %" PRIu32 " bytes exceeds the limit of %" PRIu32
                     " bytes; closing connection", n, max_frame);
            reply_error(&reply, NULL, message);
            send_frame(fd, &reply);
            free(reply.data);
            return;
        }
        char *payload = malloc(n ? n : 1);
        if (!payload) return;
        if (n && read_exact(fd, payload, n) != 1) {
            free(payload);
            return;
        }
        handle(&reply, payload, n);
        free(payload);
        const bool sent = send_frame(fd, &reply);
        free(reply.data);
        if (!sent) return;
    }
}

static void on_sigterm(int sig) {
    (void)sig;
    stopping = 1;
}

/* A non-negative integer member of a flat JSON object given on the command line. */
static bool config_integer(const char *json, const char *key, uint64_t *out) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *at = strstr(json, quoted);
    if (!at) return false;
    at = strchr(at + strlen(quoted), ':');
    if (!at) return false;
    char *end = NULL;
    errno = 0;
    const unsigned long long v = strtoull(at + 1, &end, 10);
    if (errno || end == at + 1) return false;
    *out = v;
    return true;
}

static int usage(void) {
    fprintf(stderr, "usage: memops --socket PATH --ready PATH [--log PATH] [--config JSON] [--max-frame-bytes N]\n");
    return 2;
}

int main(int argc, char **argv) {
    const double t_main = now_ms();
    const char *socket_path = NULL, *ready_path = NULL, *log_path = NULL, *config = NULL;
    uint32_t max_frame = DEFAULT_MAX_FRAME;
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        if (i + 1 >= argc) return usage();
        if (strcmp(a, "--socket") == 0) socket_path = argv[++i];
        else if (strcmp(a, "--ready") == 0) ready_path = argv[++i];
        else if (strcmp(a, "--log") == 0) log_path = argv[++i];
        else if (strcmp(a, "--config") == 0) config = argv[++i];
        else if (strcmp(a, "--max-frame-bytes") == 0) max_frame = (uint32_t)strtoul(argv[++i], NULL, 10);
        else return usage();
    }
    if (!socket_path || !ready_path) return usage();
    (void)log_path; /* start-function sends our output there until we are ready */
    if (config) {
        uint64_t v;
        if (config_integer(config, "seed", &v)) seed = v;
        if (config_integer(config, "ro_pages", &v)) ro_pages = v;
        if (config_integer(config, "range_pages", &v)) range_pages = v;
        if (ro_pages < 1 || range_pages < 4 || ro_pages > (1u << 20) || range_pages > (1u << 16)) {
            fprintf(stderr, "memops: ro_pages must be in 1..1048576 and range_pages in 4..65536\n");
            return 1;
        }
    }
    /* Inherited descriptors would be dumped (and checked at restore) with the instance. */
    for (int fd = 3; fd < 1024; ++fd) close(fd);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction term = {0};
    term.sa_handler = on_sigterm;
    sigaction(SIGTERM, &term, NULL);

    const double t_init = now_ms();
    if (!build_ranges()) {
        fprintf(stderr, "memops: init failed: %s\n", problem);
        return 1;
    }
    init_ms = now_ms() - t_init;

    const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof address.sun_path) {
        fprintf(stderr, "memops: socket path too long: %s\n", socket_path);
        return 1;
    }
    strcpy(address.sun_path, socket_path);
    unlink(socket_path);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 16) != 0) {
        fprintf(stderr, "memops: cannot listen on %s: %s\n", socket_path, strerror(errno));
        return 1;
    }

    char temporary[4096];
    snprintf(temporary, sizeof temporary, "%s.tmp.%ld", ready_path, (long)getpid());
    FILE *ready = fopen(temporary, "we");
    if (!ready) {
        fprintf(stderr, "memops: cannot write %s: %s\n", temporary, strerror(errno));
        return 1;
    }
    struct text line = {0};
    printf_(&line, "{\"function\": \"" FUNCTION_NAME "\", \"pid\": %ld, \"ns_pid\": %ld, \"socket\": ", pid_seen_from_proc(),
            (long)getpid());
    put_string(&line, socket_path);
    printf_(&line, ", \"init_ms\": %.3f, \"startup_ms\": %.3f}\n", init_ms, now_ms() - t_main);
    fputs(line.data, ready);
    free(line.data);
    if (fclose(ready) != 0 || rename(temporary, ready_path) != 0) {
        fprintf(stderr, "memops: cannot write %s: %s\n", ready_path, strerror(errno));
        return 1;
    }
    /* No file but /dev/null stays open (CRIU checks a regular file's size at restore). */
    const int null_fd = open("/dev/null", O_RDWR);
    if (null_fd >= 0) {
        dup2(null_fd, 0);
        dup2(null_fd, 1);
        dup2(null_fd, 2);
        if (null_fd > 2) close(null_fd);
    }
    if (chdir("/") != 0) return 1;

    while (!stopping) {
        const int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return 1;
        }
        serve_connection(fd, max_frame);
        close(fd);
    }
    return 0;
}
