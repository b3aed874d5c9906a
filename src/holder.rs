//! Naming the holder of a flock from `/proc`, without being fooled by PID
//! namespaces or by filesystems whose `st_dev` is not the device number the
//! kernel's lock table prints.
//!
//! - **Whose `/proc` is it?** `/proc/locks` and `/proc/<pid>` speak in PIDs
//!   of the PID namespace that `/proc` was mounted for. A process in another
//!   one (`unshare --pid` without remounting `/proc`) would read numbers that
//!   mean other processes to it, so [`proc_view`] checks that `/proc/self`
//!   is this process.
//! - **Which device number?** `/proc/locks` prints the device of the inode's
//!   superblock (`s_dev`). `stat(2)` on btrfs gives each subvolume an
//!   anonymous device of its own, and overlayfs may report the underlying
//!   layer's; a lookup by `st_dev` then misses the lock. [`lock_key`] takes
//!   the number the kernel prints instead: the file's mount from
//!   `/proc/self/fdinfo/<fd>` (`mnt_id:`, and `ino:` where the kernel shows
//!   it), and that mount's `major:minor` from `/proc/self/mountinfo`, which
//!   is the superblock's `s_dev` (`proc(5)`).
//!
//! Linux only; elsewhere there is no `/proc` to ask. This belongs with the
//! other platform code in `sys` once that is split per platform.

use std::fs::File;

/// What `/proc` can tell this process.
// Without /proc (not Linux) only `Absent` is ever made.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcView {
    /// `/proc` is mounted for our own PID namespace: its PIDs are ours.
    Ours,
    /// `/proc` belongs to another PID namespace: its PIDs mean other
    /// processes here, or none.
    Foreign,
    /// No `/proc` (macOS, the BSDs, a Linux chroot without it).
    Absent,
}

/// Whether `/proc` speaks in this process's PIDs: `/proc/self` must name
/// `getpid()`.
#[cfg(target_os = "linux")]
pub(crate) fn proc_view() -> ProcView {
    match std::fs::read_link("/proc/self") {
        Ok(target) => match target.to_str().and_then(|t| t.parse::<u32>().ok()) {
            Some(pid) if pid == std::process::id() => ProcView::Ours,
            _ => ProcView::Foreign,
        },
        Err(_) => ProcView::Absent,
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn proc_view() -> ProcView {
    ProcView::Absent
}

/// The holder `/proc/locks` lists for `file` under the kernel's own device
/// number, when that differs from `stat(2)`'s (else `None`: the caller
/// already looked under `stat`'s).
#[cfg(target_os = "linux")]
pub(crate) fn flock_holder_by_lock_key(file: &File) -> Option<u32> {
    let (major, minor, ino) = lock_key_if_different(file)?;
    crate::sys::flock_holder_key(major, minor, ino)
        .ok()
        .flatten()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn flock_holder_by_lock_key(_file: &File) -> Option<u32> {
    None
}

/// The `(major, minor, inode)` under which `/proc/locks` lists locks on
/// `file`, when it differs from what `stat(2)` says; `None` when it is the
/// same, or cannot be learnt.
#[cfg(target_os = "linux")]
pub(crate) fn lock_key_if_different(file: &File) -> Option<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let stat_key = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino(),
    );
    let key = lock_key(file, meta.ino())?;
    (key != stat_key).then_some(key)
}

/// The superblock's device and the inode number of `file`, as the kernel
/// prints them in `/proc/locks`; `stat_ino` where fdinfo has no `ino:` line
/// (kernels before 5.14).
#[cfg(target_os = "linux")]
fn lock_key(file: &File, stat_ino: u64) -> Option<(u64, u64, u64)> {
    use std::os::fd::AsRawFd;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    let (mnt_id, ino) = parse_fdinfo(&fdinfo)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (major, minor) = parse_mountinfo(&mountinfo, mnt_id)?;
    Some((major, minor, ino.unwrap_or(stat_ino)))
}

/// `mnt_id:` and, if present, `ino:` from `/proc/<pid>/fdinfo/<fd>`.
// Pure parsing, unit-tested on every platform; only Linux calls it.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn parse_fdinfo(text: &str) -> Option<(u64, Option<u64>)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("mnt_id:")?, field("ino:")))
}

/// The `major:minor` of mount `mnt_id` in `/proc/<pid>/mountinfo` (third
/// field, decimal; `proc(5)`).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn parse_mountinfo(text: &str, mnt_id: u64) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()?.parse::<u64>().ok()? != mnt_id {
            return None;
        }
        let _parent = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        /// Any text as `/proc/locks`, fdinfo or mountinfo: never a panic.
        #[test]
        fn proc_parsers_never_panic(text in ".{0,160}", id in 0u64..40) {
            let _ = crate::sys::parse_proc_locks(&text, 0, 0x1a, id);
            let _ = parse_fdinfo(&text);
            let _ = parse_mountinfo(&text, id);
        }
    }

    #[test]
    fn fdinfo_gives_the_mount_and_the_inode() {
        let text = "pos:\t0\nflags:\t0100002\nmnt_id:\t31\nino:\t5120\nlock:\t1: FLOCK ADVISORY WRITE 77 00:2a:5120 0 EOF\n";
        assert_eq!(parse_fdinfo(text), Some((31, Some(5120))));
        assert_eq!(parse_fdinfo("pos:\t0\nmnt_id:\t9\n"), Some((9, None)));
        assert_eq!(parse_fdinfo("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo("mnt_id:\tx\n"), None);
    }

    #[test]
    fn mountinfo_gives_that_mounts_superblock_device() {
        let text = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 27 0:45 /@home /home rw,relatime shared:1 - btrfs /dev/loop0 rw
310 27 259:3 / /data rw - ext4 /dev/nvme0n1p3 rw
";
        assert_eq!(parse_mountinfo(text, 31), Some((0, 45)));
        assert_eq!(parse_mountinfo(text, 310), Some((259, 3)));
        assert_eq!(parse_mountinfo(text, 3), None);
        assert_eq!(parse_mountinfo("garbage\n31\n31 1 nocolon\n", 31), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_sees_its_own_proc_and_an_ordinary_files_key_matches_stat() {
        assert_eq!(proc_view(), ProcView::Ours);
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        // An ordinary filesystem: the superblock's device is st_dev.
        assert_eq!(lock_key_if_different(&f), None);
    }
}
