//! The built-in trainer on a CUDA GPU (`resolute train --device cuda`): the same
//! network, data order, dropout masks and AdamW as the CPU path, with the layers'
//! forward and backward passes and the optimizer step as CUDA kernels (compiled
//! at run time by NVRTC, loaded through the driver; nothing is needed at build
//! time).
//!
//! Each output element is computed by one thread summing in the CPU's order, with
//! no fused multiply-adds (`--fmad=false`), correctly rounded division and square
//! root, and no atomics: the GPU computes the same IEEE operations in the same
//! order as the CPU, so its metrics match the CPU's bit for bit, and a checkpoint
//! from either device resumes on the other. Randomness (dropout masks, batch
//! order) is drawn on the host from the same streams.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use crate::trainer::{
    after_batch, mean_squared_error, stream, unit, Batches, Data, Ended, Reporter, State,
};

const KERNELS: &str = r#"
extern "C" __global__ void dense_forward(const float* w, const float* b, const float* in,
    float* out, const float* mask, int batch, int inputs, int outputs, int relu,
    int use_mask, float keep) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= batch * outputs) return;
    int r = k / outputs, o = k % outputs;
    float sum = 0.0f;
    for (int i = 0; i < inputs; ++i) sum = __fadd_rn(sum, __fmul_rn(w[o * inputs + i], in[r * inputs + i]));
    float v = __fadd_rn(b[o], sum);
    if (relu) {
        v = fmaxf(v, 0.0f);
        if (use_mask) v = mask[k] != 0.0f ? 0.0f : __fdiv_rn(v, keep);
    }
    out[k] = v;
}

extern "C" __global__ void dense_grad(const float* delta, const float* in, float* gw,
    float* gb, int batch, int inputs, int outputs) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < outputs * inputs) {
        int o = k / inputs, i = k % inputs;
        float g = 0.0f;
        for (int r = 0; r < batch; ++r) g = __fadd_rn(g, __fmul_rn(delta[r * outputs + o], in[r * inputs + i]));
        gw[k] = g;
    } else if (k < outputs * inputs + outputs) {
        int o = k - outputs * inputs;
        float g = 0.0f;
        for (int r = 0; r < batch; ++r) g = __fadd_rn(g, delta[r * outputs + o]);
        gb[o] = g;
    }
}

extern "C" __global__ void dense_back(const float* delta, const float* w, const float* act,
    float* back, int batch, int inputs, int outputs, int use_mask, float inv_keep) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= batch * inputs) return;
    int r = k / inputs, i = k % inputs;
    float s = 0.0f;
    for (int o = 0; o < outputs; ++o) s = __fadd_rn(s, __fmul_rn(delta[r * outputs + o], w[o * inputs + i]));
    if (act[k] <= 0.0f) s = 0.0f;
    if (use_mask) s = __fmul_rn(s, inv_keep);
    back[k] = s;
}

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, int n,
    float lr, float wd, float b1, float b2, float eps, float c1, float c2) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float gk = g[k];
    m[k] = __fadd_rn(__fmul_rn(b1, m[k]), __fmul_rn(__fsub_rn(1.0f, b1), gk));
    v[k] = __fadd_rn(__fmul_rn(b2, v[k]), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, b2), gk), gk));
    float mhat = __fdiv_rn(m[k], c1);
    float vhat = __fdiv_rn(v[k], c2);
    float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), eps)), __fmul_rn(wd, p[k]));
    p[k] = __fsub_rn(p[k], __fmul_rn(lr, step));
}
"#;

/// Threads per block of every kernel.
const BLOCK_THREADS: u32 = 256;

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK_THREADS).max(1), 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn err(e: impl std::fmt::Display) -> String {
    format!("cuda: {e}")
}

/// One layer's parameters and optimizer moments on the GPU.
struct GpuLayer {
    inputs: usize,
    outputs: usize,
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    mw: CudaSlice<f32>,
    mb: CudaSlice<f32>,
    vw: CudaSlice<f32>,
    vb: CudaSlice<f32>,
    gw: CudaSlice<f32>,
    gb: CudaSlice<f32>,
}

struct Kernels {
    forward: CudaFunction,
    grad: CudaFunction,
    back: CudaFunction,
    adamw: CudaFunction,
}

struct Gpu {
    stream: Arc<CudaStream>,
    k: Kernels,
    layers: Vec<GpuLayer>,
}

impl Gpu {
    fn new(state: &State) -> Result<Gpu, String> {
        let ctx = CudaContext::new(0).map_err(err)?;
        let stream = ctx.default_stream();
        let opts = cudarc::nvrtc::CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map_err(|e| format!("compiling the kernels with NVRTC: {e}"))?;
        let module = ctx.load_module(ptx).map_err(err)?;
        let f = |name: &str| module.load_function(name).map_err(err);
        let k = Kernels {
            forward: f("dense_forward")?,
            grad: f("dense_grad")?,
            back: f("dense_back")?,
            adamw: f("adamw")?,
        };
        let mut layers = Vec::new();
        let mut at = 0;
        for l in &state.layers {
            let (nw, nb) = (l.w.len(), l.b.len());
            let up = |v: &[f32]| stream.clone_htod(v).map_err(err);
            layers.push(GpuLayer {
                inputs: l.inputs,
                outputs: l.outputs,
                w: up(&l.w)?,
                b: up(&l.b)?,
                mw: up(&state.m[at..at + nw])?,
                mb: up(&state.m[at + nw..at + nw + nb])?,
                vw: up(&state.v[at..at + nw])?,
                vb: up(&state.v[at + nw..at + nw + nb])?,
                gw: stream.alloc_zeros(nw).map_err(err)?,
                gb: stream.alloc_zeros(nb).map_err(err)?,
            });
            at += nw + nb;
        }
        Ok(Gpu { stream, k, layers })
    }

    /// Copies parameters and moments back into `state` (for a checkpoint).
    fn download(&self, state: &mut State) -> Result<(), String> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (g, l) in self.layers.iter().zip(state.layers.iter_mut()) {
            let down = |s: &CudaSlice<f32>| self.stream.clone_dtoh(s).map_err(err);
            l.w = down(&g.w)?;
            l.b = down(&g.b)?;
            m.extend(down(&g.mw)?);
            m.extend(down(&g.mb)?);
            v.extend(down(&g.vw)?);
            v.extend(down(&g.vb)?);
        }
        state.m = m;
        state.v = v;
        Ok(())
    }

    /// Forward pass over `rows` rows; returns every layer's output (post ReLU and
    /// dropout), the input first.
    #[allow(unsafe_code)]
    fn forward(
        &self,
        x: CudaSlice<f32>,
        rows: usize,
        masks: &[Option<CudaSlice<f32>>],
        keep: f32,
    ) -> Result<Vec<CudaSlice<f32>>, String> {
        let mut acts = vec![x];
        for (li, l) in self.layers.iter().enumerate() {
            let hidden = li + 1 < self.layers.len();
            let mut out = self
                .stream
                .alloc_zeros::<f32>(rows * l.outputs)
                .map_err(err)?;
            let (batch, inputs, outputs) = (rows as i32, l.inputs as i32, l.outputs as i32);
            let relu = i32::from(hidden);
            let mask = masks.get(li).and_then(Option::as_ref);
            let use_mask = i32::from(mask.is_some());
            let mask = mask.unwrap_or(&l.b);
            let input = &acts[li];
            let mut launch = self.stream.launch_builder(&self.k.forward);
            launch
                .arg(&l.w)
                .arg(&l.b)
                .arg(input)
                .arg(&mut out)
                .arg(mask)
                .arg(&batch)
                .arg(&inputs)
                .arg(&outputs)
                .arg(&relu)
                .arg(&use_mask)
                .arg(&keep);
            // SAFETY: dense_forward reads w (outputs*inputs), b (outputs), in
            // (rows*inputs) and, when use_mask is set, mask (rows*outputs); it writes
            // out (rows*outputs), and only for k < rows*outputs. All are that size.
            unsafe { launch.launch(cfg(rows * l.outputs)) }.map_err(err)?;
            acts.push(out);
        }
        Ok(acts)
    }
}

/// Trains on GPU 0 from `state` until `target` batches, like `trainer::train`.
#[allow(unsafe_code)]
pub fn train(
    data: &Data,
    mut state: State,
    target: u64,
    reporter: &mut dyn Reporter,
) -> Result<Ended, String> {
    let h = state.hparams.clone();
    let mut gpu = Gpu::new(&state)?;
    let mut batches = Batches::new(&state, data);
    let mut dropout = stream(state.seed, 0);
    dropout.set_word_pos(state.dropout_word_pos);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let p = h.dropout as f32;
    let keep = 1.0 - p;
    let inv_keep = 1.0 / (1.0 - h.dropout as f32);
    let hidden_layers = state.layers.len() - 1;
    let val_x: Vec<f32> = data
        .validation
        .iter()
        .flat_map(|(x, _)| x.clone())
        .collect();
    let val_x = gpu.stream.clone_htod(&val_x).map_err(err)?;
    let mut target = target;
    loop {
        while state.step < target {
            let rows = batches.rows(data, state.step);
            let bsz = rows.len();
            // Dropout masks in the CPU's draw order: sample by sample, layer by layer.
            let mut masks: Vec<Vec<f32>> = state.layers[..hidden_layers]
                .iter()
                .map(|l| vec![0.0; bsz * l.outputs])
                .collect();
            if p > 0.0 {
                for r in 0..bsz {
                    for (li, l) in state.layers[..hidden_layers].iter().enumerate() {
                        for o in 0..l.outputs {
                            masks[li][r * l.outputs + o] =
                                if unit(&mut dropout) < p { 1.0 } else { 0.0 };
                        }
                    }
                }
            }
            let masks: Vec<Option<CudaSlice<f32>>> = masks
                .iter()
                .map(|m| {
                    (p > 0.0)
                        .then(|| gpu.stream.clone_htod(m).map_err(err))
                        .transpose()
                })
                .collect::<Result<_, _>>()?;
            let x: Vec<f32> = rows.iter().flat_map(|(x, _)| x.clone()).collect();
            let x = gpu.stream.clone_htod(&x).map_err(err)?;
            let acts = gpu.forward(x, bsz, &masks, keep)?;
            let preds = gpu.stream.clone_dtoh(&acts[acts.len() - 1]).map_err(err)?;
            let scale = 1.0 / bsz as f32;
            let mut loss = 0.0f32;
            let mut delta = Vec::with_capacity(bsz);
            for (pred, (_, y)) in preds.iter().zip(&rows) {
                let e = pred - y;
                loss += e * e * scale;
                delta.push(2.0 * e * scale);
            }
            let mut delta = gpu.stream.clone_htod(&delta).map_err(err)?;
            let Gpu { stream, k, layers } = &mut gpu;
            for li in (0..layers.len()).rev() {
                let l = &mut layers[li];
                let (batch, inputs, outputs) = (bsz as i32, l.inputs as i32, l.outputs as i32);
                let mut launch = stream.launch_builder(&k.grad);
                launch
                    .arg(&delta)
                    .arg(&acts[li])
                    .arg(&mut l.gw)
                    .arg(&mut l.gb)
                    .arg(&batch)
                    .arg(&inputs)
                    .arg(&outputs);
                // SAFETY: dense_grad reads delta (batch*outputs) and in (batch*inputs),
                // writes gw (outputs*inputs) and gb (outputs), guarded by k.
                unsafe { launch.launch(cfg(l.outputs * l.inputs + l.outputs)) }.map_err(err)?;
                if li > 0 {
                    let mut back = stream.alloc_zeros::<f32>(bsz * l.inputs).map_err(err)?;
                    let use_mask = i32::from(p > 0.0);
                    let mut launch = stream.launch_builder(&k.back);
                    launch
                        .arg(&delta)
                        .arg(&l.w)
                        .arg(&acts[li])
                        .arg(&mut back)
                        .arg(&batch)
                        .arg(&inputs)
                        .arg(&outputs)
                        .arg(&use_mask)
                        .arg(&inv_keep);
                    // SAFETY: dense_back reads delta (batch*outputs), w (outputs*inputs),
                    // act (batch*inputs) and writes back (batch*inputs), guarded by k.
                    unsafe { launch.launch(cfg(bsz * l.inputs)) }.map_err(err)?;
                    delta = back;
                }
            }
            state.step += 1;
            let t = state.step as i32;
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let (lr, wd) = (h.lr as f32, h.weight_decay as f32);
            for l in layers.iter_mut() {
                for (pp, g, m, v) in [
                    (&mut l.w, &l.gw, &mut l.mw, &mut l.vw),
                    (&mut l.b, &l.gb, &mut l.mb, &mut l.vb),
                ] {
                    let count = pp.len() as i32;
                    let mut launch = stream.launch_builder(&k.adamw);
                    launch
                        .arg(pp)
                        .arg(g)
                        .arg(m)
                        .arg(v)
                        .arg(&count)
                        .arg(&lr)
                        .arg(&wd)
                        .arg(&b1)
                        .arg(&b2)
                        .arg(&eps)
                        .arg(&c1)
                        .arg(&c2);
                    // SAFETY: adamw reads and writes n elements of p, m, v and reads n of g.
                    unsafe { launch.launch(cfg(count as usize)) }.map_err(err)?;
                }
            }
            state.dropout_word_pos = dropout.get_word_pos();
            let (step, every) = (state.step, h.validate_every);
            let validate = || {
                let nv = data.validation.len();
                let acts = gpu.forward(val_x.clone(), nv, &[], keep)?;
                let preds = gpu.stream.clone_dtoh(&acts[acts.len() - 1]).map_err(err)?;
                gpu.download(&mut state)?;
                Ok((mean_squared_error(&preds, &data.validation), state.clone()))
            };
            if let Some(ended) = after_batch(step, target, loss, every, reporter, validate)? {
                return Ok(ended);
            }
        }
        match reporter.next_target(state.step)? {
            Some(t) if t > state.step => target = t,
            _ => return Ok(Ended::Completed),
        }
    }
}
