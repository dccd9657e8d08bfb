//! The I/O bus between vCPUs and the VMM's devices: what a vCPU's port and
//! MMIO accesses reach, whatever runs the vCPU (KVM or the soft stand-in),
//! and the interrupt lines through which devices reach the guest.

/// Port and MMIO accesses of the guest, served by the VMM's devices.
///
/// Each method returns whether a device handled the access. The vCPU layer
/// answers unhandled reads with all-ones bytes (as a PC bus does) and counts
/// unhandled accesses. Called on vCPU threads: a handler must not block for
/// long (a device that writes to a file may; one that waits on a peer must
/// not).
pub trait IoHandler: Send + Sync {
    /// A read of `data.len()` bytes from I/O port `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool;
    /// A write of `data` to I/O port `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
    /// A read of `data.len()` bytes from guest-physical `addr` outside RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// A write of `data` to guest-physical `addr` outside RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// A bus with no device: every access is unhandled (reads give all-ones
/// bytes and are counted by the vCPU layer). The KVM vCPUs start with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDevices;

impl IoHandler for NoDevices {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }
    fn pio_write(&self, _: u16, _: &[u8]) -> bool {
        false
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }
}

/// An interrupt line a device raises (an edge: each call is one interrupt).
///
/// With KVM, [`KvmVm::irqfd`](crate::kvm::KvmVm::irqfd) gives one that
/// injects a GSI through the in-kernel irqchip without a vCPU exit. Called
/// with the device's lock held, possibly on a vCPU thread: it must not
/// block.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> std::io::Result<()>;
}
