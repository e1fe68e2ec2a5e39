// SNAPTIER_TRY(var, expr): evaluate a Result-returning expr; on error return it from the
// enclosing function, else bind the value to `var`. Keeps edge parsers free of if-chains.
#pragma once

#include <utility>

#include "snaptier/error.hpp"

#define SNAPTIER_TRY(var, expr)                                    \
  auto var##_result = (expr);                                      \
  if (!var##_result) return tl::unexpected(var##_result.error()); \
  auto var = std::move(*var##_result)
