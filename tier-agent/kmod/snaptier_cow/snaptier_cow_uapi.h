/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The user interface of the snaptier_cow module (one source of truth for the module and the
 * tier agent): /dev/snaptier-cow lends one device-dax range as private copy-on-write mappings.
 */
#ifndef SNAPTIER_COW_UAPI_H
#define SNAPTIER_COW_UAPI_H

#ifdef __KERNEL__
#include <linux/ioctl.h>
#include <linux/types.h>
#else
#include <linux/ioctl.h>
#include <linux/types.h>
#endif

#define SNAPTIER_COW_DEVICE "/dev/snaptier-cow"

/* A physical range of device memory (ZONE_DEVICE pages of a device-dax instance). */
struct snaptier_cow_range {
	__u64 start; /* physical address, page aligned */
	__u64 size;  /* bytes, page aligned; 0 in GET means "no range yet" */
};

/* Set the range (CAP_SYS_ADMIN). Setting the current range again is a no-op; a different one
 * fails with EBUSY while any mapping exists. File offset 0 of the device is `start`. */
#define SNAPTIER_COW_SET_RANGE _IOW('S', 0x01, struct snaptier_cow_range)
#define SNAPTIER_COW_GET_RANGE _IOR('S', 0x02, struct snaptier_cow_range)

#endif
