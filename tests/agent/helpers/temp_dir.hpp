// A scratch directory removed with everything in it when the test ends.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace snaptier::testing {

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base ? base : "/tmp") + "/snaptier-test-XXXXXX";
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A sparse regular file standing in for a devdax device.
inline std::filesystem::path make_region_file(const std::filesystem::path& dir, std::uint64_t size,
                                              const std::string& name = "region.cxl") {
  const auto path = dir / name;
  { std::ofstream create(path, std::ios::binary); }
  std::filesystem::resize_file(path, size);
  return path;
}

}  // namespace snaptier::testing
