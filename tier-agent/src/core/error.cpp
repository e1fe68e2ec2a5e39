#include "snaptier/error.hpp"

#include <cstring>

namespace snaptier {

std::string_view to_string(Errc code) noexcept {
  switch (code) {
    case Errc::invalid_argument: return "invalid argument";
    case Errc::not_found: return "not found";
    case Errc::already_exists: return "already exists";
    case Errc::no_space: return "no space";
    case Errc::corrupt: return "corrupt";
    case Errc::io: return "i/o error";
    case Errc::unsupported: return "unsupported";
    case Errc::timeout: return "timeout";
    case Errc::unavailable: return "unavailable";
    case Errc::permission_denied: return "permission denied";
    case Errc::protocol: return "protocol error";
    case Errc::busy: return "busy";
  }
  return "unknown error";
}

tl::unexpected<Error> fail_errno(Errc code, std::string_view what, int err) {
  return fail(code, std::string(what) + ": " + std::strerror(err));
}

}  // namespace snaptier
