// The one description of each CRIU message the agent reads or writes (criu 4.1.1 images/*.proto:
// inventory, pstree, mm, vma, pagemap, fdinfo, regfile, fown; and of rpc.proto the part of
// criu_req / criu_opts / criu_resp a restore through a `criu swrk` worker uses). The parsers
// (images.cpp), the image rewrite (inplace_rewrite.cpp) and the worker (mechanism/criu_worker.cpp)
// go through these: a field number, name or kind lives here and nowhere else.
#pragma once

#include <cstdint>

#include "criu/pb_message.hpp"

namespace snaptier::criu::schema {

using pb::FieldSpec;
using pb::Kind;
using pb::MessageSpec;

namespace inventory {
inline constexpr FieldSpec img_version{1, "img_version", Kind::u32, true};
inline constexpr FieldSpec fdinfo_per_id{2, "fdinfo_per_id", Kind::boolean, false};
inline constexpr FieldSpec ns_per_id{4, "ns_per_id", Kind::boolean, false};
inline constexpr FieldSpec root_cg_set{5, "root_cg_set", Kind::u32, false};
inline constexpr FieldSpec lsmtype{6, "lsmtype", Kind::u32, false};
inline constexpr FieldSpec dump_uptime{8, "dump_uptime", Kind::u64, false};
inline constexpr FieldSpec pre_dump_mode{9, "pre_dump_mode", Kind::u32, false};
inline constexpr FieldSpec kFields[] = {img_version, fdinfo_per_id, ns_per_id, root_cg_set,
                                        lsmtype,     dump_uptime,   pre_dump_mode};
inline constexpr MessageSpec kSpec{"inventory_entry", kFields};
}  // namespace inventory

namespace pstree {
inline constexpr FieldSpec pid{1, "pid", Kind::u32, true};
inline constexpr FieldSpec ppid{2, "ppid", Kind::u32, true};
inline constexpr FieldSpec pgid{3, "pgid", Kind::u32, true};
inline constexpr FieldSpec sid{4, "sid", Kind::u32, true};
inline constexpr FieldSpec threads{5, "threads", Kind::repeated_u32, false};
inline constexpr FieldSpec kFields[] = {pid, ppid, pgid, sid, threads};
inline constexpr MessageSpec kSpec{"pstree_entry", kFields};
}  // namespace pstree

namespace vma {
inline constexpr FieldSpec start{1, "start", Kind::u64, true};
inline constexpr FieldSpec end{2, "end", Kind::u64, true};
inline constexpr FieldSpec pgoff{3, "pgoff", Kind::u64, true};
inline constexpr FieldSpec shmid{4, "shmid", Kind::u64, true};
inline constexpr FieldSpec prot{5, "prot", Kind::u32, true};
inline constexpr FieldSpec flags{6, "flags", Kind::u32, true};
inline constexpr FieldSpec status{7, "status", Kind::u32, true};
inline constexpr FieldSpec fd{8, "fd", Kind::sint64, true};
inline constexpr FieldSpec madv{9, "madv", Kind::u64, false};
inline constexpr FieldSpec fdflags{10, "fdflags", Kind::u32, false};
inline constexpr FieldSpec kFields[] = {start, end, pgoff, shmid, prot, flags, status, fd, madv, fdflags};
inline constexpr MessageSpec kSpec{"vma_entry", kFields};
}  // namespace vma

namespace mm {
inline constexpr FieldSpec mm_start_code{1, "mm_start_code", Kind::u64, true};
inline constexpr FieldSpec mm_end_code{2, "mm_end_code", Kind::u64, true};
inline constexpr FieldSpec mm_start_data{3, "mm_start_data", Kind::u64, true};
inline constexpr FieldSpec mm_end_data{4, "mm_end_data", Kind::u64, true};
inline constexpr FieldSpec mm_start_stack{5, "mm_start_stack", Kind::u64, true};
inline constexpr FieldSpec mm_start_brk{6, "mm_start_brk", Kind::u64, true};
inline constexpr FieldSpec mm_brk{7, "mm_brk", Kind::u64, true};
inline constexpr FieldSpec mm_arg_start{8, "mm_arg_start", Kind::u64, true};
inline constexpr FieldSpec mm_arg_end{9, "mm_arg_end", Kind::u64, true};
inline constexpr FieldSpec mm_env_start{10, "mm_env_start", Kind::u64, true};
inline constexpr FieldSpec mm_env_end{11, "mm_env_end", Kind::u64, true};
inline constexpr FieldSpec exe_file_id{12, "exe_file_id", Kind::u32, true};
inline constexpr FieldSpec mm_saved_auxv{13, "mm_saved_auxv", Kind::repeated_u64, false};
inline constexpr FieldSpec vmas{14, "vmas", Kind::message, false};
inline constexpr FieldSpec dumpable{15, "dumpable", Kind::i32, false};
inline constexpr FieldSpec thp_disabled{17, "thp_disabled", Kind::boolean, false};  // 16: aios, kept as is
inline constexpr FieldSpec kFields[] = {mm_start_code, mm_end_code,  mm_start_data, mm_end_data,  mm_start_stack,
                                        mm_start_brk,  mm_brk,       mm_arg_start,  mm_arg_end,   mm_env_start,
                                        mm_env_end,    exe_file_id,  mm_saved_auxv, vmas,         dumpable,
                                        thp_disabled};
inline constexpr MessageSpec kSpec{"mm_entry", kFields};
}  // namespace mm

namespace pagemap_head {
inline constexpr FieldSpec pages_id{1, "pages_id", Kind::u32, true};
inline constexpr FieldSpec kFields[] = {pages_id};
inline constexpr MessageSpec kSpec{"pagemap_head", kFields};
}  // namespace pagemap_head

namespace pagemap_entry {
inline constexpr FieldSpec vaddr{1, "vaddr", Kind::u64, true};
inline constexpr FieldSpec nr_pages{2, "nr_pages", Kind::u32, true};  // compat_nr_pages, what criu 4.1 writes
inline constexpr FieldSpec in_parent{3, "in_parent", Kind::boolean, false};
inline constexpr FieldSpec flags{4, "flags", Kind::u32, false};
inline constexpr FieldSpec nr_pages64{5, "nr_pages (64-bit)", Kind::u64, false};
inline constexpr FieldSpec kFields[] = {vaddr, nr_pages, in_parent, flags, nr_pages64};
inline constexpr MessageSpec kSpec{"pagemap_entry", kFields};
}  // namespace pagemap_entry

// files.img: file_entry (fdinfo.proto) with, for regular files, a reg_file_entry (regfile.proto).
inline constexpr std::uint32_t kFilesMagic = 0x56303138;  // "Toropets"
inline constexpr std::uint64_t kFdTypeReg = 1;           // fd_types.REG

namespace file_entry {
inline constexpr FieldSpec type{1, "type", Kind::u32, true};
inline constexpr FieldSpec id{2, "id", Kind::u32, true};
inline constexpr FieldSpec reg{3, "reg", Kind::message, false};
inline constexpr FieldSpec kFields[] = {type, id, reg};
inline constexpr MessageSpec kSpec{"file_entry", kFields};
}  // namespace file_entry

namespace reg_file_entry {
inline constexpr FieldSpec id{1, "id", Kind::u32, true};
inline constexpr FieldSpec flags{2, "flags", Kind::u32, true};
inline constexpr FieldSpec pos{3, "pos", Kind::u64, true};
inline constexpr FieldSpec fown{5, "fown", Kind::message, true};
inline constexpr FieldSpec name{6, "name", Kind::string, true};
inline constexpr FieldSpec mnt_id{7, "mnt_id", Kind::sint32, false};
inline constexpr FieldSpec size{8, "size", Kind::u64, false};
inline constexpr FieldSpec mode{10, "mode", Kind::u32, false};
inline constexpr FieldSpec kFields[] = {id, flags, pos, fown, name, mnt_id, size, mode};
inline constexpr MessageSpec kSpec{"reg_file_entry", kFields};
}  // namespace reg_file_entry

namespace fown_entry {
inline constexpr FieldSpec uid{1, "uid", Kind::u32, true};
inline constexpr FieldSpec euid{2, "euid", Kind::u32, true};
inline constexpr FieldSpec signum{3, "signum", Kind::u32, true};
inline constexpr FieldSpec pid_type{4, "pid_type", Kind::u32, true};
inline constexpr FieldSpec pid{5, "pid", Kind::u32, true};
inline constexpr FieldSpec kFields[] = {uid, euid, signum, pid_type, pid};
inline constexpr MessageSpec kSpec{"fown_entry", kFields};
}  // namespace fown_entry

// ---- rpc.proto (CRIU's RPC: one message per SOCK_SEQPACKET packet, no framing) -----------------

inline constexpr std::uint32_t kRpcRestore = 2;  // criu_req_type RESTORE

namespace criu_opts {
inline constexpr FieldSpec images_dir_fd{1, "images_dir_fd", Kind::i32, true};  // the client's fd, via /proc
inline constexpr FieldSpec log_level{9, "log_level", Kind::i32, false};
inline constexpr FieldSpec log_file{10, "log_file", Kind::string, false};        // relative to the work dir
inline constexpr FieldSpec work_dir_fd{17, "work_dir_fd", Kind::i32, false};     // the client's fd, via /proc
inline constexpr FieldSpec lazy_pages{48, "lazy_pages", Kind::boolean, false};
inline constexpr FieldSpec leave_stopped{69, "leave_stopped", Kind::boolean, false};
inline constexpr FieldSpec kFields[] = {images_dir_fd, log_level, log_file, work_dir_fd, lazy_pages, leave_stopped};
inline constexpr MessageSpec kSpec{"criu_opts", kFields};
}  // namespace criu_opts

namespace criu_req {
inline constexpr FieldSpec type{1, "type", Kind::u32, true};
inline constexpr FieldSpec opts{2, "opts", Kind::message, false};
inline constexpr FieldSpec kFields[] = {type, opts};
inline constexpr MessageSpec kSpec{"criu_req", kFields};
}  // namespace criu_req

namespace criu_restore_resp {
inline constexpr FieldSpec pid{1, "pid", Kind::i32, true};
inline constexpr FieldSpec kFields[] = {pid};
inline constexpr MessageSpec kSpec{"criu_restore_resp", kFields};
}  // namespace criu_restore_resp

namespace criu_resp {
inline constexpr FieldSpec type{1, "type", Kind::u32, true};
inline constexpr FieldSpec success{2, "success", Kind::boolean, true};
inline constexpr FieldSpec restore{4, "restore", Kind::message, false};
inline constexpr FieldSpec cr_errno{7, "cr_errno", Kind::i32, false};
inline constexpr FieldSpec cr_errmsg{9, "cr_errmsg", Kind::string, false};
inline constexpr FieldSpec kFields[] = {type, success, restore, cr_errno, cr_errmsg};
inline constexpr MessageSpec kSpec{"criu_resp", kFields};
}  // namespace criu_resp

}  // namespace snaptier::criu::schema
