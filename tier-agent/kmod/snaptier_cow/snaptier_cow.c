// SPDX-License-Identifier: GPL-2.0
/*
 * snaptier_cow: private copy-on-write mappings of a device-dax range.
 *
 * device-dax only allows shared mappings (drivers/dax/device.c, check_vma), so a restored
 * process cannot use a snapshot's pages where they lie in shared CXL memory and still write
 * them privately. This device maps the same physical pages read-only into MAP_PRIVATE VMAs
 * (VM_MIXEDMAP, vmf_insert_mixed with a devmap pfn, as fsdax does) and leaves every write to
 * the kernel's own copy-on-write (do_wp_page -> wp_page_copy copies into an anonymous page).
 * Nothing is ever written to the device through it: shared mappings are refused, so the
 * snapshot store's guarantees (only the owning agent writes an extent) hold.
 *
 * A read fault in a 2 MiB block of the mapping whose device pages are 2 MiB-aligned maps the
 * whole block (a devmap PMD, as device-dax's own PMD faults do); a write to such a block splits
 * it and copies one page through the pte path. `pmd_mappings` (module parameter) turns that
 * off; `pmd_faults` counts the blocks mapped.
 *
 * Reference: docs/restore-policies.md ("In place") and ../shared/in-place-mapping.md.
 */
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/memremap.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pfn_t.h>
#include <linux/huge_mm.h>
#include <linux/moduleparam.h>
#include <linux/sysfs.h>
#include <linux/uaccess.h>

#include "snaptier_cow_uapi.h"

#define MAX_PAGEMAPS 16

struct pagemap_set {
	struct dev_pagemap *maps[MAX_PAGEMAPS];
	int nr;
};

static DEFINE_MUTEX(range_lock);
static struct snaptier_cow_range range;	/* guarded by range_lock; stable while mappings > 0 */
static atomic_t mappings = ATOMIC_INIT(0);
static struct pagemap_set held;	/* the lent range's pagemaps; guarded by range_lock */

static bool pmd_mappings = true;
module_param(pmd_mappings, bool, 0644);
MODULE_PARM_DESC(pmd_mappings, "map a 2 MiB-aligned block of the device per read fault where the mapping allows it");

static atomic_long_t pmd_faults = ATOMIC_LONG_INIT(0);

static int get_pmd_faults(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%ld\n", atomic_long_read(&pmd_faults));
}

static const struct kernel_param_ops pmd_faults_ops = { .get = get_pmd_faults };
module_param_cb(pmd_faults, &pmd_faults_ops, NULL, 0444);
MODULE_PARM_DESC(pmd_faults, "2 MiB blocks mapped by a single fault since the module was loaded");

static void release_pagemaps(struct pagemap_set *set)
{
	while (set->nr > 0)
		put_dev_pagemap(set->maps[--set->nr]);
}

/*
 * Every page of the range must be device-dax memory (MEMORY_DEVICE_GENERIC): never system RAM
 * (that would lend arbitrary kernel memory) and never device-private memory. The pagemaps are
 * held while the range is lent, so the dax device cannot go away under a mapping.
 */
static int take_range(const struct snaptier_cow_range *r, struct pagemap_set *set)
{
	unsigned long pfn = PHYS_PFN(r->start);
	const unsigned long end = PHYS_PFN(r->start + r->size);

	while (pfn < end) {
		struct dev_pagemap *found = get_dev_pagemap(pfn, NULL);
		unsigned long next = pfn + 1;
		int err = 0;

		if (!found)
			err = -EINVAL;
		else if (found->type != MEMORY_DEVICE_GENERIC)
			err = -EINVAL;
		else if (set->nr == MAX_PAGEMAPS)
			err = -E2BIG;
		if (err) {
			if (found)
				put_dev_pagemap(found);
			release_pagemaps(set);
			return err;
		}
		set->maps[set->nr++] = found;
		/* Skip to the end of the pagemap range that holds pfn. */
		for (int i = 0; i < found->nr_range; i++) {
			const struct range *pr = &found->ranges[i];

			if (PFN_PHYS(pfn) >= pr->start && PFN_PHYS(pfn) <= pr->end)
				next = max(next, (unsigned long)PHYS_PFN(pr->end + 1));
		}
		pfn = next;
	}
	return 0;
}

static long set_range(const struct snaptier_cow_range __user *arg)
{
	struct snaptier_cow_range r;
	struct pagemap_set taken = { .nr = 0 };
	int err;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (copy_from_user(&r, arg, sizeof(r)))
		return -EFAULT;
	if (r.size == 0 || !PAGE_ALIGNED(r.start) || !PAGE_ALIGNED(r.size) || r.start + r.size < r.start)
		return -EINVAL;
	mutex_lock(&range_lock);
	if (range.size && r.start == range.start && r.size == range.size) {
		err = 0;
	} else if (atomic_read(&mappings) > 0) {
		err = -EBUSY;
	} else {
		/* A refused range leaves the lent one as it was. */
		err = take_range(&r, &taken);
		if (!err) {
			release_pagemaps(&held);
			held = taken;
			range = r;
		}
	}
	mutex_unlock(&range_lock);
	return err;
}

static long snaptier_cow_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct snaptier_cow_range r;

	switch (cmd) {
	case SNAPTIER_COW_SET_RANGE:
		return set_range((const struct snaptier_cow_range __user *)arg);
	case SNAPTIER_COW_GET_RANGE:
		mutex_lock(&range_lock);
		r = range;
		mutex_unlock(&range_lock);
		return copy_to_user((void __user *)arg, &r, sizeof(r)) ? -EFAULT : 0;
	default:
		return -ENOTTY;
	}
}

static vm_fault_t snaptier_cow_fault(struct vm_fault *vmf)
{
	const u64 size = READ_ONCE(range.size);
	phys_addr_t phys;

	if (vmf->pgoff >= size >> PAGE_SHIFT)
		return VM_FAULT_SIGBUS;
	phys = READ_ONCE(range.start) + ((phys_addr_t)vmf->pgoff << PAGE_SHIFT);
	/*
	 * Read-only even for a write fault: do_cow_fault drops its page on VM_FAULT_NOPAGE, the
	 * write is retried against this pte and do_wp_page copies the page.
	 */
	return vmf_insert_mixed(vmf->vma, vmf->address, phys_to_pfn_t(phys, PFN_DEV | PFN_MAP));
}

/*
 * Called by the kernel for a fault on an empty PMD of a VMA that may hold huge mappings (ours:
 * VM_HUGEPAGE, a special VM_MIXEDMAP file mapping). Only read faults on a block that lies whole
 * in the VMA and in the lent range, at a 2 MiB-aligned device address; anything else falls back
 * to snaptier_cow_fault one page at a time.
 */
static vm_fault_t snaptier_cow_huge_fault(struct vm_fault *vmf, unsigned int order)
{
	struct vm_area_struct *vma = vmf->vma;
	const unsigned long block = vmf->address & PMD_MASK;
	const u64 size = READ_ONCE(range.size);
	pgoff_t pgoff;
	phys_addr_t phys;
	vm_fault_t ret;

	if (order != PMD_ORDER || !READ_ONCE(pmd_mappings) || (vmf->flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE)))
		return VM_FAULT_FALLBACK;
	if (block < vma->vm_start || block + PMD_SIZE > vma->vm_end)
		return VM_FAULT_FALLBACK;
	pgoff = vma->vm_pgoff + ((block - vma->vm_start) >> PAGE_SHIFT);
	if (pgoff + PTRS_PER_PMD > size >> PAGE_SHIFT)
		return VM_FAULT_FALLBACK;
	phys = READ_ONCE(range.start) + ((phys_addr_t)pgoff << PAGE_SHIFT);
	if (!IS_ALIGNED(phys, PMD_SIZE))
		return VM_FAULT_FALLBACK;
	ret = vmf_insert_pfn_pmd(vmf, phys_to_pfn_t(phys, PFN_DEV | PFN_MAP), false);
	if (ret == VM_FAULT_NOPAGE)
		atomic_long_inc(&pmd_faults);
	return ret;
}

static void snaptier_cow_vm_open(struct vm_area_struct *vma)
{
	atomic_inc(&mappings);
}

static void snaptier_cow_vm_close(struct vm_area_struct *vma)
{
	atomic_dec(&mappings);
}

static const struct vm_operations_struct snaptier_cow_vm_ops = {
	.open = snaptier_cow_vm_open,
	.close = snaptier_cow_vm_close,
	.fault = snaptier_cow_fault,
	.huge_fault = snaptier_cow_huge_fault,
};

static int snaptier_cow_mmap(struct file *file, struct vm_area_struct *vma)
{
	int err = 0;

	if (vma->vm_flags & VM_MAYSHARE)
		return -EINVAL;	/* private mappings only: nothing writes the shared device here */
	mutex_lock(&range_lock);
	if (!range.size)
		err = -ENODEV;
	else if (vma->vm_pgoff + vma_pages(vma) > range.size >> PAGE_SHIFT ||
		 vma->vm_pgoff + vma_pages(vma) < vma->vm_pgoff)
		err = -EINVAL;
	if (!err) {
		/* VM_HUGEPAGE: huge faults also where THP is "madvise" rather than "always". */
		vm_flags_set(vma, VM_MIXEDMAP | VM_HUGEPAGE);
		vma->vm_ops = &snaptier_cow_vm_ops;
		atomic_inc(&mappings);
	}
	mutex_unlock(&range_lock);
	return err;
}

static const struct file_operations snaptier_cow_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = snaptier_cow_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = snaptier_cow_mmap,
	.llseek = noop_llseek,
};

static struct miscdevice snaptier_cow_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "snaptier-cow",
	.fops = &snaptier_cow_fops,
	.mode = 0600,
};

static int __init snaptier_cow_init(void)
{
	return misc_register(&snaptier_cow_misc);
}

static void __exit snaptier_cow_exit(void)
{
	misc_deregister(&snaptier_cow_misc);
	release_pagemaps(&held);
}

module_init(snaptier_cow_init);
module_exit(snaptier_cow_exit);
MODULE_DESCRIPTION("snaptier: private copy-on-write mappings of a device-dax range");
MODULE_LICENSE("GPL");
