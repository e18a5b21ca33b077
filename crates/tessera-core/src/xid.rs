//! What an XID error says about a GPU, from NVIDIA's XID catalogue, and how long a GPU that had
//! a hardware fault stays out of placement.
//!
//! - **Application** XIDs are the program's fault: 13 (graphics engine exception), 31 (GPU
//!   memory page fault), 43 (GPU stopped processing), 45 (preemptive cleanup after an earlier
//!   error), 68 (video decoder exception) and 69 (graphics engine class error). The attempt
//!   fails by itself and its job's retry policy decides; the GPU stays in service.
//! - Every other XID is treated as a **hardware** fault, among them 48 (double-bit ECC), 61 and
//!   62 (internal micro-controller), 63 and 64 (row remapping), 74 (NVLink), 79 (fallen off the
//!   bus), 92 (high single-bit ECC rate), 94 and 95 (contained and uncontained ECC), 119 and 120
//!   (GSP), as are uncorrectable ECC errors reported without an XID. The GPU is taken out of
//!   placement and its shard requeued. It comes back by itself after [`COOL_DOWN_MS`], unless it
//!   had [`FAULTS_TO_RETIRE`] hardware faults within [`FAULT_WINDOW_MS`]: then it stays out
//!   until an operator clears it (`tessera node clear-gpu`), which also forgets its faults.

/// What an XID error means for the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidClass {
    /// The program's fault: the GPU stays in service.
    Application,
    /// The GPU's (or its driver's) fault: the GPU is taken out of placement.
    Hardware,
}

/// XIDs that are the program's fault.
pub const APPLICATION_XIDS: [u32; 6] = [13, 31, 43, 45, 68, 69];

/// How long a GPU stays out after a hardware fault, unless it is retired: 10 minutes.
pub const COOL_DOWN_MS: u64 = 10 * 60 * 1000;
/// The window over which hardware faults are counted: 24 hours.
pub const FAULT_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Hardware faults within the window that keep a GPU out until an operator clears it.
pub const FAULTS_TO_RETIRE: usize = 3;

/// The class of an XID; unknown numbers are hardware faults.
pub fn classify(xid: u32) -> XidClass {
    if APPLICATION_XIDS.contains(&xid) { XidClass::Application } else { XidClass::Hardware }
}
