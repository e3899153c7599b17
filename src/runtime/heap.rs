//! glibc `malloc` settings for libtorch work on the CPU.
//!
//! Why: libtorch allocates every training step's activations with `malloc` and frees them when the step
//! ends. With glibc's defaults the freed top of the heap goes back to the kernel (`trim_threshold` is at most
//! 64 MiB) and tensors above the dynamic mmap threshold are mapped and unmapped every time, so the next step
//! faults each of those pages in again, zeroed by the kernel. Measured on stage 1 (ResNet-18, batch 64, 2
//! cores, `tools/bench_stages12.py stage1`): 1.5–1.8 M page faults per `latent` run with the defaults, 0.26 M
//! with these settings, and 39–47 → 48–51 images/s (BENCHMARKS.md). A Python process escapes this by
//! accident (its own small objects sit at the heap top and block the trim); a Rust process has none there.
//!
//! The setting keeps freed memory in the process: allocations up to 32 MiB (glibc's upper bound for the
//! mmap threshold) come from the heap, and the heap is never trimmed. The resident size then stays at the
//! job's peak until the process exits, which a training command reaches anyway on every step. Commands that
//! run libtorch on large tensors call [`keep_freed_memory`] first (`latent`, `sample`, `train`, `eval`,
//! `run`); long-lived servers do not. A user who set glibc's malloc tunables (`GLIBC_TUNABLES` with
//! `glibc.malloc.*`, or the `MALLOC_*_` variables) keeps them: nothing is changed then.

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapSetting {
    /// The heap keeps freed memory (mmap threshold 32 MiB, no trimming).
    Kept,
    /// The user's own malloc tunables are in the environment; left as they are.
    UserTunables,
    /// Not glibc (or `mallopt` refused): the allocator's defaults stay.
    Unsupported,
}

/// glibc's largest accepted `M_MMAP_THRESHOLD` on 64-bit (`DEFAULT_MMAP_THRESHOLD_MAX`).
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Environment variables through which a user tunes glibc malloc.
const MALLOC_VARS: [&str; 5] = [
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
];

/// Whether the environment already carries malloc tunables the user chose.
pub fn user_tunables(get: impl Fn(&str) -> Option<String>) -> bool {
    get("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc."))
        || MALLOC_VARS.iter().any(|v| get(v).is_some())
}

/// Makes the process keep freed heap memory for reuse (see the module docs). Call it before the first
/// large allocation; calling it again is harmless.
pub fn keep_freed_memory() -> HeapSetting {
    if user_tunables(|k| std::env::var(k).ok()) {
        tracing::debug!("malloc: the environment sets glibc malloc tunables; keeping them");
        return HeapSetting::UserTunables;
    }
    let setting = apply();
    tracing::debug!("malloc: {setting:?}");
    setting
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> HeapSetting {
    // SAFETY: mallopt only changes allocator parameters; glibc takes its own lock. -1 for the trim
    // threshold means "never trim" (mallopt(3)).
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
    };
    if ok {
        HeapSetting::Kept
    } else {
        HeapSetting::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> HeapSetting {
    HeapSetting::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn user_tunables_are_recognised() {
        assert!(!user_tunables(env(&[])));
        assert!(!user_tunables(env(&[(
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX512F"
        )])));
        assert!(user_tunables(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.trim_threshold=1"
        )])));
        assert!(user_tunables(env(&[("MALLOC_ARENA_MAX", "2")])));
        assert!(user_tunables(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        // mallopt returns 0 for a value out of range (32 MiB is glibc's maximum for the mmap threshold).
        assert_eq!(apply(), HeapSetting::Kept);
    }
}
