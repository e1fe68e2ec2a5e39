#include "inplace/dax_device.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <memory>

#ifdef SNAPTIER_HAVE_DAXCTL
#include <daxctl/libdaxctl.h>
#endif

#include "snaptier_cow/snaptier_cow_uapi.h"
#include "core/unique_fd.hpp"

namespace snaptier::inplace {

Result<DaxDevice> find_dax_device(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return fail_errno(Errc::io, "stat " + path.string(), errno);
  if (!S_ISCHR(st.st_mode)) return fail(Errc::invalid_argument, path.string() + " is not a character device");
#ifdef SNAPTIER_HAVE_DAXCTL
  daxctl_ctx* raw = nullptr;
  if (int rc = daxctl_new(&raw); rc < 0) return fail_errno(Errc::io, "libdaxctl: daxctl_new", -rc);
  const std::unique_ptr<daxctl_ctx, void (*)(daxctl_ctx*)> ctx(raw, daxctl_unref);
  daxctl_region* region = nullptr;
  daxctl_region_foreach(ctx.get(), region) {
    daxctl_dev* dev = nullptr;
    daxctl_dev_foreach(region, dev) {
      if (static_cast<unsigned>(daxctl_dev_get_major(dev)) != major(st.st_rdev) ||
          static_cast<unsigned>(daxctl_dev_get_minor(dev)) != minor(st.st_rdev))
        continue;
      DaxDevice out;
      out.name = daxctl_dev_get_devname(dev);
      out.mode = daxctl_dev_get_memory(dev) ? "system-ram" : "devdax";
      out.size = daxctl_dev_get_size(dev);
      out.align = daxctl_dev_get_align(dev);
      out.phys_start = daxctl_dev_get_resource(dev);
      // Static regions (nvdimm namespaces) list no mappings: one range. Dynamic ones (CXL ram
      // regions) list theirs; contiguous neighbours count as one.
      std::uint32_t ranges = 0;
      unsigned long long next = 0;
      daxctl_mapping* mapping = nullptr;
      daxctl_mapping_foreach(dev, mapping) {
        const unsigned long long start = daxctl_mapping_get_start(mapping);
        if (ranges == 0 || start != next) ++ranges;
        if (ranges == 1 && start < out.phys_start) out.phys_start = start;
        next = daxctl_mapping_get_end(mapping) + 1;
      }
      out.ranges = ranges == 0 ? 1 : ranges;
      return out;
    }
  }
  return fail(Errc::not_found, "libdaxctl lists no dax device " + std::to_string(major(st.st_rdev)) + ":" +
                                   std::to_string(minor(st.st_rdev)) + " for " + path.string());
#else
  return fail(Errc::unsupported, "this agent was built without libdaxctl (libdaxctl-dev), so it cannot find " +
                                     path.string() + "'s physical range");
#endif
}

Result<std::filesystem::path> lend_to_cow_device(const DaxDevice& device) {
  const std::filesystem::path node = SNAPTIER_COW_DEVICE;
  if (device.mode != "devdax") return fail(Errc::unsupported, device.name + " is in " + device.mode + " mode, not devdax");
  if (device.ranges != 1) {
    return fail(Errc::unsupported, device.name + " is made of " + std::to_string(device.ranges) +
                                       " physical ranges; snaptier_cow lends one");
  }
  detail::UniqueFd fd(::open(node.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT) return fail(Errc::unsupported, "the snaptier_cow module is not loaded (no " + node.string() + ")");
    return fail_errno(Errc::io, "open " + node.string(), err);
  }
  snaptier_cow_range range{device.phys_start, device.size};
  if (::ioctl(fd.get(), SNAPTIER_COW_SET_RANGE, &range) != 0) {
    const int err = errno;
    if (err == EBUSY) {
      return fail(Errc::unavailable, node.string() + " lends another range that is still mapped");
    }
    if (err == EINVAL) {
      return fail(Errc::unsupported, node.string() + " refuses " + device.name +
                                         "'s range (not device-dax memory in one piece, or not page aligned)");
    }
    return fail_errno(Errc::io, "ioctl SNAPTIER_COW_SET_RANGE on " + node.string(), err);
  }
  return node;
}

}  // namespace snaptier::inplace
