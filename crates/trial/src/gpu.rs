//! GPU discovery (NVML, loaded at run time) and a probe of each GPU (CUDA driver
//! API through cudarc, loaded at run time): a node offers a GPU as a slot only
//! when the probe creates a context, allocates, runs a kernel and reads back the
//! right answer. Without NVML (no NVIDIA driver) the node offers CPU slots.
//! Nothing here needs a CUDA toolkit at build time.

use std::sync::Arc;

use serde::Serialize;

/// Elements of the probe kernel's buffers.
const PROBE_ELEMENTS: usize = 1 << 18;

/// One GPU as NVML sees it, and whether it may be offered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    /// NVML index (also the CUDA ordinal when `CUDA_VISIBLE_DEVICES` is unset).
    pub index: u32,
    /// NVML uuid (stable across reboots and `CUDA_VISIBLE_DEVICES` orders).
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// MIG mode is on (the GPU is split into instances).
    pub mig: bool,
    /// Volatile uncorrected ECC errors, where the GPU counts them.
    pub ecc_uncorrected: Option<u64>,
    /// Offered as a slot.
    pub usable: bool,
    /// Why not, when not usable.
    pub reason: Option<String>,
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Discovery {
    /// The NVIDIA driver version, when NVML loaded.
    pub driver: Option<String>,
    /// Why NVML did not load (no NVIDIA driver: CPU slots).
    pub nvml_error: Option<String>,
    /// Every GPU NVML lists.
    pub gpus: Vec<GpuInfo>,
}

impl Discovery {
    /// The GPUs to offer as slots.
    pub fn usable(&self) -> impl Iterator<Item = &GpuInfo> {
        self.gpus.iter().filter(|g| g.usable)
    }
}

/// Which of the GPUs a node offers (their uuids, in slot order) are healthy now:
/// NVML still lists the GPU and finds nothing wrong with it (it has a uuid and no
/// uncorrected ECC errors). A GPU that disappears or starts failing leaves the
/// node's capacity; one that recovers comes back. `None` when NVML itself could
/// not be asked (then nothing is known, and nothing should change).
pub fn healthy_slots(offered: &[String], now: &Discovery) -> Option<Vec<bool>> {
    if now.nvml_error.is_some() {
        return None;
    }
    Some(
        offered
            .iter()
            .map(|uuid| now.gpus.iter().any(|g| g.uuid == *uuid && g.usable))
            .collect(),
    )
}

/// Lists the GPUs and probes each one (with `probe` false, only lists them).
pub fn discover(probe: bool) -> Discovery {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            return Discovery {
                driver: None,
                nvml_error: Some(e.to_string()),
                gpus: Vec::new(),
            }
        }
    };
    let driver = nvml.sys_driver_version().ok();
    let count = nvml.device_count().unwrap_or(0);
    let mut gpus = Vec::new();
    for index in 0..count {
        let info = match nvml.device_by_index(index) {
            Ok(d) => describe(index, &d),
            Err(e) => GpuInfo {
                index,
                uuid: String::new(),
                model: String::new(),
                memory_mib: 0,
                compute_capability: (0, 0),
                mig: false,
                ecc_uncorrected: None,
                usable: false,
                reason: Some(format!("NVML cannot open it: {e}")),
            },
        };
        gpus.push(info);
    }
    if probe {
        for g in gpus.iter_mut().filter(|g| g.usable) {
            if let Err(reason) = probe_gpu(g.index as usize) {
                g.usable = false;
                g.reason = Some(format!("probe failed: {reason}"));
            }
        }
    }
    Discovery {
        driver,
        nvml_error: None,
        gpus,
    }
}

fn describe(index: u32, d: &nvml_wrapper::Device<'_>) -> GpuInfo {
    use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
    let uuid = d.uuid().unwrap_or_default();
    let ecc = d
        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
        .ok();
    let mut reason = None;
    if uuid.is_empty() {
        reason = Some("NVML reports no uuid (the GPU may have fallen off the bus)".to_string());
    } else if ecc.is_some_and(|n| n > 0) {
        reason = Some(format!(
            "{} uncorrected ECC errors since the driver loaded",
            ecc.unwrap_or(0)
        ));
    }
    GpuInfo {
        index,
        uuid,
        model: d.name().unwrap_or_default(),
        memory_mib: d.memory_info().map_or(0, |m| m.total >> 20),
        compute_capability: d
            .cuda_compute_capability()
            .map_or((0, 0), |c| (c.major, c.minor)),
        mig: d.mig_mode().is_ok_and(|m| m.current == 1),
        ecc_uncorrected: ecc,
        usable: reason.is_none(),
        reason,
    }
}

/// The probe kernel: `out[i] = in[i] + 1` (PTX, JIT-compiled by the driver, so
/// no NVRTC or toolkit is needed).
const PROBE_PTX: &str = r#"
.version 7.0
.target sm_50
.address_size 64

.visible .entry add_one(
    .param .u64 out,
    .param .u64 inp,
    .param .u32 n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<3>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [inp];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd4, %rd5;
    ld.global.f32 %f1, [%rd6];
    add.f32 %f2, %f1, 0f3F800000;
    add.s64 %rd7, %rd3, %rd5;
    st.global.f32 [%rd7], %f2;
DONE:
    ret;
}
"#;

/// Creates a context on CUDA device `ordinal`, allocates, runs the probe kernel
/// and checks its output.
pub fn probe_gpu(ordinal: usize) -> Result<(), String> {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    // cudarc panics when libcuda cannot be loaded; a probe must report, not crash.
    let result = std::panic::catch_unwind(|| -> Result<(), String> {
        let ctx: Arc<CudaContext> = CudaContext::new(ordinal).map_err(|e| e.to_string())?;
        let stream = ctx.default_stream();
        let input: Vec<f32> = (0..PROBE_ELEMENTS).map(|i| i as f32).collect();
        let inp = stream.clone_htod(&input).map_err(|e| e.to_string())?;
        let mut out = stream
            .alloc_zeros::<f32>(PROBE_ELEMENTS)
            .map_err(|e| e.to_string())?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(PROBE_PTX))
            .map_err(|e| format!("loading the probe kernel: {e}"))?;
        let f = module.load_function("add_one").map_err(|e| e.to_string())?;
        let n = PROBE_ELEMENTS as u32;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&mut out).arg(&inp).arg(&n);
        // SAFETY: `add_one` takes (float* out, const float* in, u32 n) and touches
        // only indices below n; both buffers hold exactly n f32s, allocated above.
        #[allow(unsafe_code)]
        unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }
            .map_err(|e| format!("launching the probe kernel: {e}"))?;
        let back = stream.clone_dtoh(&out).map_err(|e| e.to_string())?;
        match back
            .iter()
            .enumerate()
            .find(|(i, v)| **v != *i as f32 + 1.0)
        {
            Some((i, v)) => Err(format!("wrong result at {i}: {v}")),
            None => Ok(()),
        }
    });
    match result {
        Ok(r) => r,
        Err(_) => Err("the CUDA driver library could not be loaded".to_string()),
    }
}
