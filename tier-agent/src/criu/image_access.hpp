// Typed views of schema-checked CRIU messages (criu/schema.hpp), shared by the parsers
// (images.cpp) and the image rewrite (inplace_rewrite.cpp) so both read a VMA or a pagemap
// entry the same way.
#pragma once

#include "criu/pb_message.hpp"
#include "snaptier/criu_images.hpp"

namespace snaptier::criu {

// `m` decoded with schema::vma::kSpec.
[[nodiscard]] VmaEntry vma_from_message(const pb::Message& m);
// `m` decoded with schema::pagemap_entry::kSpec; flags and nr_pages normalized as CRIU does.
[[nodiscard]] PagemapEntry pagemap_entry_from_message(const pb::Message& m);

}  // namespace snaptier::criu
