// Errors are values: every fallible call returns Result<T>. No exceptions on the fault path.
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

namespace snaptier {

enum class Errc {
  invalid_argument,   // caller passed something malformed (bad config, bad request)
  not_found,          // no such snapshot / extent / blob
  already_exists,     // an id or name is taken
  no_space,           // a tier or arena is full
  corrupt,            // checksum mismatch, torn entry, truncated image
  io,                 // a system call failed (errno in the message)
  unsupported,        // the tier or build cannot do this
  timeout,            // a wait ran out
  unavailable,        // a peer or device is gone
  permission_denied,  // authentication failed
  protocol,           // a peer spoke something we do not understand
  busy,               // at a bound of concurrent work (or the object is in use): retry later
};

[[nodiscard]] std::string_view to_string(Errc code) noexcept;

struct Error {
  Errc code;
  std::string message;

  [[nodiscard]] std::string what() const { return std::string(to_string(code)) + ": " + message; }
};

template <class T>
using Result = tl::expected<T, Error>;

[[nodiscard]] inline tl::unexpected<Error> fail(Errc code, std::string message) {
  return tl::unexpected<Error>(Error{code, std::move(message)});
}

// fail(Errc::io, "open /dev/dax0.0") with ": <strerror(errno)>" appended.
[[nodiscard]] tl::unexpected<Error> fail_errno(Errc code, std::string_view what, int err);

}  // namespace snaptier
