// The snaptier_cow module (tier-agent/kmod/snaptier_cow/): a private mapping of
// /dev/snaptier-cow reads the dax device's own bytes, a write copies one page into local
// memory and leaves the device untouched, MADV_DONTNEED goes back to the device's bytes, a
// forked child shares them, kernel readers (/proc/PID/mem) see them, and shared or
// out-of-range mappings are refused. Runs in the testbed's guests, where 30-cxl loads the
// module over the CXL dax device; elsewhere it skips with the reason. Nothing here writes the
// device (the agent's directory lives in it).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/unique_fd.hpp"
#include "helpers/temp_dir.hpp"
#include "inplace/dax_device.hpp"
#include "inplace/inplace.hpp"
#include "snaptier_cow/snaptier_cow_uapi.h"

namespace {

using snaptier::detail::UniqueFd;
namespace fs = std::filesystem;

constexpr std::size_t kPage = 4096;
constexpr std::size_t kLength = 2u << 20;  // devdax maps in its alignment (2 MiB)

fs::path first_dax_device() {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/dev", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("dax", 0) == 0 && name.find('.') != std::string::npos) return entry.path();
  }
  return {};
}

struct Mapping {
  void* data = MAP_FAILED;
  std::size_t length = 0;
  Mapping(int fd, std::size_t len, int prot, int flags) : data(::mmap(nullptr, len, prot, flags, fd, 0)), length(len) {}
  ~Mapping() {
    if (data != MAP_FAILED) ::munmap(data, length);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  [[nodiscard]] unsigned char* bytes() const { return static_cast<unsigned char*>(data); }
};

// "Anonymous:" of the VMA that starts at `start` in /proc/self/smaps, in bytes.
std::uint64_t anonymous_bytes_of(const void* start) {
  std::ifstream smaps("/proc/self/smaps");
  std::ostringstream want;
  want << std::hex << reinterpret_cast<std::uintptr_t>(start) << "-";
  std::string line;
  bool in_vma = false;
  while (std::getline(smaps, line)) {
    if (line.find('-') != std::string::npos && line.find(':') > line.find(' ')) {
      in_vma = line.rfind(want.str(), 0) == 0;
    } else if (in_vma && line.rfind("Anonymous:", 0) == 0) {
      return std::stoull(line.substr(10)) * 1024;
    }
  }
  return ~0ull;
}

class CowDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(SNAPTIER_COW_DEVICE)) GTEST_SKIP() << "the snaptier_cow module is not loaded (guests load it in 30-cxl)";
    dax_path = first_dax_device();
    if (dax_path.empty()) GTEST_SKIP() << "no dax device on this host";
    auto device = snaptier::inplace::find_dax_device(dax_path);
    ASSERT_TRUE(device) << device.error().what();
    auto node = snaptier::inplace::lend_to_cow_device(*device);  // the agent's range: a no-op
    ASSERT_TRUE(node) << node.error().what();
    dax = UniqueFd(::open(dax_path.c_str(), O_RDONLY | O_CLOEXEC));
    cow = UniqueFd(::open(SNAPTIER_COW_DEVICE, O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(dax && cow);
    size = device->size;
  }
  fs::path dax_path;
  UniqueFd dax, cow;
  std::uint64_t size = 0;
};

TEST_F(CowDevice, PrivateMappingReadsTheDeviceAndCopiesOnlyWrittenPages) {
  Mapping device(dax.get(), kLength, PROT_READ, MAP_SHARED);
  ASSERT_NE(device.data, MAP_FAILED) << std::strerror(errno);
  Mapping lent(cow.get(), kLength, PROT_READ | PROT_WRITE, MAP_PRIVATE);
  ASSERT_NE(lent.data, MAP_FAILED) << std::strerror(errno);
  ASSERT_EQ(std::memcmp(device.data, lent.data, kLength), 0) << "a private mapping must read the device's bytes";
  EXPECT_EQ(anonymous_bytes_of(lent.data), 0u) << "read pages are the device's, not local copies";

  const std::size_t page = 7;
  const unsigned char before = device.bytes()[page * kPage + 5];
  lent.bytes()[page * kPage + 5] = static_cast<unsigned char>(before ^ 0xff);
  EXPECT_EQ(lent.bytes()[page * kPage + 5], static_cast<unsigned char>(before ^ 0xff));
  EXPECT_EQ(device.bytes()[page * kPage + 5], before) << "a write must never reach the shared device";
  EXPECT_EQ(std::memcmp(lent.bytes() + page * kPage + 6, device.bytes() + page * kPage + 6, kPage - 6), 0)
      << "the copy must hold the rest of the page's bytes";
  EXPECT_EQ(anonymous_bytes_of(lent.data), kPage) << "one write, one local page";

  // A write to a page never read before (write fault on an empty pte) copies too.
  lent.bytes()[100 * kPage] ^= 1;
  EXPECT_EQ(device.bytes()[100 * kPage], static_cast<unsigned char>(lent.bytes()[100 * kPage] ^ 1));
  EXPECT_EQ(anonymous_bytes_of(lent.data), 2 * kPage);

  // File-backed semantics: DONTNEED drops the copies and the device's bytes come back.
  ASSERT_EQ(::madvise(lent.data, kLength, MADV_DONTNEED), 0) << std::strerror(errno);
  EXPECT_EQ(std::memcmp(device.data, lent.data, kLength), 0);
  EXPECT_EQ(anonymous_bytes_of(lent.data), 0u);
}

TEST_F(CowDevice, ForkedChildSharesTheDevicePagesAndCopiesItsOwnWrites) {
  Mapping device(dax.get(), kLength, PROT_READ, MAP_SHARED);
  Mapping lent(cow.get(), kLength, PROT_READ | PROT_WRITE, MAP_PRIVATE);
  ASSERT_NE(device.data, MAP_FAILED);
  ASSERT_NE(lent.data, MAP_FAILED);
  lent.bytes()[0] ^= 0x5a;  // the parent's own copy of page 0
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    bool ok = std::memcmp(lent.bytes() + kPage, device.bytes() + kPage, kLength - kPage) == 0;
    ok = ok && lent.bytes()[0] == static_cast<unsigned char>(device.bytes()[0] ^ 0x5a);
    lent.bytes()[3 * kPage] ^= 0x11;  // the child's copy; the parent must not see it
    ok = ok && device.bytes()[3 * kPage] == static_cast<unsigned char>(lent.bytes()[3 * kPage] ^ 0x11);
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child saw wrong bytes";
  EXPECT_EQ(lent.bytes()[3 * kPage], device.bytes()[3 * kPage]) << "the child's write leaked into the parent";
}

TEST_F(CowDevice, KernelReadersSeeTheMappedPages) {
  // /proc/PID/mem, process_vm_readv, ptrace: get_user_pages on the devmap ptes.
  Mapping device(dax.get(), kLength, PROT_READ, MAP_SHARED);
  Mapping lent(cow.get(), kLength, PROT_READ | PROT_WRITE, MAP_PRIVATE);
  ASSERT_NE(lent.data, MAP_FAILED);
  volatile unsigned char touch = lent.bytes()[9 * kPage];
  (void)touch;
  UniqueFd mem(::open("/proc/self/mem", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(mem);
  std::string got(kPage, '\0');
  ASSERT_EQ(::pread(mem.get(), got.data(), kPage, static_cast<off_t>(reinterpret_cast<std::uintptr_t>(lent.bytes() + 9 * kPage))),
            static_cast<ssize_t>(kPage))
      << std::strerror(errno);
  EXPECT_EQ(std::memcmp(got.data(), device.bytes() + 9 * kPage, kPage), 0);
}

TEST_F(CowDevice, RefusesSharedAndOutOfRangeMappings) {
  UniqueFd rw(::open(SNAPTIER_COW_DEVICE, O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(rw);
  void* shared = ::mmap(nullptr, kPage, PROT_READ, MAP_SHARED, rw.get(), 0);
  EXPECT_EQ(shared, MAP_FAILED) << "a shared mapping would let writes reach the device";
  if (shared != MAP_FAILED) ::munmap(shared, kPage);
  void* past = ::mmap(nullptr, kPage, PROT_READ, MAP_PRIVATE, cow.get(), static_cast<off_t>(size));
  EXPECT_EQ(past, MAP_FAILED) << "a mapping past the device's end";
  if (past != MAP_FAILED) ::munmap(past, kPage);
  snaptier_cow_range other{0, kPage};  // page 0 of RAM is not device memory
  EXPECT_NE(::ioctl(cow.get(), SNAPTIER_COW_SET_RANGE, &other), 0);
  snaptier_cow_range now{};
  ASSERT_EQ(::ioctl(cow.get(), SNAPTIER_COW_GET_RANGE, &now), 0);
  EXPECT_EQ(now.size, size) << "a refused range must leave the lent one in place";
}

// The module's count of 2 MiB blocks mapped by one fault; nullopt if it does not report one.
std::optional<long> pmd_faults() {
  std::ifstream in("/sys/module/snaptier_cow/parameters/pmd_faults");
  long n = 0;
  if (!(in >> n)) return std::nullopt;
  return n;
}

bool transparent_huge_pages_enabled() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return modes.find("[never]") == std::string::npos && !modes.empty();
}

// A read of a 2 MiB block whose address and device pages are both 2 MiB-aligned maps the whole
// block with one fault; a write still copies one page and the rest keeps reading the device.
TEST_F(CowDevice, AlignedBlocksAreMappedWholeAndStillCopyOnWrite) {
  constexpr std::size_t kBlock = 2u << 20;
  if (!transparent_huge_pages_enabled()) GTEST_SKIP() << "transparent huge pages are off in this kernel";
  const auto before = pmd_faults();
  if (!before) GTEST_SKIP() << "this snaptier_cow reports no pmd_faults (an older module)";
  snaptier_cow_range lent_range{};
  ASSERT_EQ(::ioctl(cow.get(), SNAPTIER_COW_GET_RANGE, &lent_range), 0);
  // The first device offset whose physical address is 2 MiB-aligned.
  const std::uint64_t offset = (kBlock - lent_range.start % kBlock) % kBlock;
  if (offset + kBlock > size) GTEST_SKIP() << "the device holds no whole aligned block";
  // An address 2 MiB-aligned: reserve twice the block, map inside it.
  void* reserve = ::mmap(nullptr, 2 * kBlock, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(reserve, MAP_FAILED);
  const auto aligned = (reinterpret_cast<std::uintptr_t>(reserve) + kBlock - 1) & ~(std::uintptr_t{kBlock} - 1);
  void* at = ::mmap(reinterpret_cast<void*>(aligned), kBlock, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, cow.get(),
                    static_cast<off_t>(offset));
  ASSERT_EQ(at, reinterpret_cast<void*>(aligned)) << std::strerror(errno);
  auto* lent = static_cast<unsigned char*>(at);
  Mapping device(dax.get(), offset + kBlock, PROT_READ, MAP_SHARED);
  ASSERT_NE(device.data, MAP_FAILED) << std::strerror(errno);
  const unsigned char* expected = device.bytes() + offset;

  EXPECT_EQ(std::memcmp(lent, expected, kBlock), 0) << "a block-mapped range must read the device's bytes";
  EXPECT_EQ(*pmd_faults() - *before, 1) << "one fault for the whole block";
  EXPECT_EQ(anonymous_bytes_of(lent), 0u);

  const unsigned char old = expected[5 * kPage + 9];
  lent[5 * kPage + 9] = static_cast<unsigned char>(old ^ 0xff);
  EXPECT_EQ(expected[5 * kPage + 9], old) << "a write must never reach the shared device";
  EXPECT_EQ(lent[5 * kPage + 9], static_cast<unsigned char>(old ^ 0xff));
  EXPECT_EQ(anonymous_bytes_of(lent), kPage) << "one write, one local page, not a 2 MiB copy";
  lent[5 * kPage + 9] = old;
  EXPECT_EQ(std::memcmp(lent, expected, kBlock), 0) << "after the split the other pages read the device";
  ::munmap(reserve, 2 * kBlock);
}

TEST_F(CowDevice, MeasureCountsDevicePagesApartFromLocalCopies) {
  Mapping lent(cow.get(), kLength, PROT_READ | PROT_WRITE, MAP_PRIVATE);
  ASSERT_NE(lent.data, MAP_FAILED);
  // Page by page: an aligned address would otherwise map the whole block at the first read.
  ASSERT_EQ(::madvise(lent.data, kLength, MADV_NOHUGEPAGE), 0) << std::strerror(errno);
  const volatile unsigned char* bytes = lent.bytes();
  for (std::size_t p = 0; p < 64; ++p) (void)bytes[p * kPage];  // volatile: the reads must happen
  lent.bytes()[kPage] ^= 1;
  const auto use = snaptier::inplace::measure(::getpid(), SNAPTIER_COW_DEVICE);
  EXPECT_EQ(use.mapped_cow_bytes, kPage);
  EXPECT_EQ(use.cxl_mapped_bytes, 63 * kPage);
}

// What the agent decides before any module is involved (runs everywhere).
TEST(CowBacking, RegularFileMapsItselfWithoutADevice) {
  snaptier::testing::TempDir dir;
  const fs::path file = dir.path() / "region";
  std::ofstream(file) << std::string(8192, 'x');
  const auto backing = snaptier::inplace::describe_backing(file, false);
  EXPECT_TRUE(backing.can_map);
  EXPECT_EQ(backing.file, fs::canonical(file));
  EXPECT_FALSE(backing.device);
  const auto j = snaptier::inplace::to_json(backing);
  EXPECT_TRUE(j.at("can_map").get<bool>());
  EXPECT_FALSE(j.contains("reason"));
  EXPECT_FALSE(j.contains("device"));
}

TEST(CowBacking, ADaxPathThatIsNoDaxDeviceCannotMapAndSaysWhy) {
  const auto backing = snaptier::inplace::describe_backing("/dev/null", true);
  EXPECT_FALSE(backing.can_map);
  EXPECT_NE(backing.reason.find("devdax refuses private mappings"), std::string::npos) << backing.reason;
  EXPECT_NE(snaptier::inplace::describe(backing).find("in-place: no ("), std::string::npos);
  const auto j = snaptier::inplace::to_json(backing);
  EXPECT_FALSE(j.at("can_map").get<bool>());
  EXPECT_EQ(j.at("reason").get<std::string>(), backing.reason);
}

TEST(CowBacking, OnlyADevdaxDeviceInOnePhysicalRangeIsLent) {
  snaptier::inplace::DaxDevice split{"dax9.9", "devdax", 1u << 30, 2u << 20, 0x100000000ull, 2};
  auto lent = snaptier::inplace::lend_to_cow_device(split);
  ASSERT_FALSE(lent);
  EXPECT_EQ(lent.error().code, snaptier::Errc::unsupported);
  EXPECT_NE(lent.error().message.find("2 physical ranges"), std::string::npos) << lent.error().message;

  snaptier::inplace::DaxDevice ram{"dax9.9", "system-ram", 1u << 30, 2u << 20, 0x100000000ull, 1};
  lent = snaptier::inplace::lend_to_cow_device(ram);
  ASSERT_FALSE(lent);
  EXPECT_NE(lent.error().message.find("system-ram"), std::string::npos) << lent.error().message;

  if (!fs::exists(SNAPTIER_COW_DEVICE)) {
    snaptier::inplace::DaxDevice one{"dax9.9", "devdax", 1u << 30, 2u << 20, 0x100000000ull, 1};
    lent = snaptier::inplace::lend_to_cow_device(one);
    ASSERT_FALSE(lent);
    EXPECT_NE(lent.error().message.find("not loaded"), std::string::npos) << lent.error().message;
  }
}

}  // namespace
