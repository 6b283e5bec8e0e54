//! One layer's update at one step: from a stored gradient, or row piece by
//! row piece as a GEMM hands the weight gradient over.

use crate::Moments;
use crate::rule::{CHUNK, StepRule, apply_adam_bf16, apply_rule};
use rayon::prelude::*;
use svp_tensor::GradientSink;

/// One layer's update at one step, begun by [`Optimizer::begin_update`](crate::Optimizer::begin_update): the
/// step is counted and its scalars fixed.
#[derive(Debug)]
pub struct LayerUpdate<'a> {
    rule: StepRule,
    moments: &'a mut Moments,
    /// The step's seed for bf16 moments' rounding noise.
    noise_seed: u32,
    /// Whether `weight_rows` may hand out a sink.
    takes_tiles: bool,
}

impl<'a> LayerUpdate<'a> {
    /// An update by `rule` of parameters whose moments are `moments`, with
    /// bf16 rounding noise from `noise_seed`.
    pub(crate) fn new(rule: StepRule, moments: &'a mut Moments, noise_seed: u32) -> Self {
        Self { rule, moments, noise_seed, takes_tiles: true }
    }

    /// The same update taking stored gradients only (`weight_rows` is then
    /// always `None`): the same bits, another path through memory, for
    /// measuring what the fused one saves.
    pub fn stored_gradients_only(mut self) -> Self {
        self.takes_tiles = false;
        self
    }
}

/// A layer's parameters go through [`GradientSink::apply`] with their stored
/// gradient, or a weight matrix's through [`GradientSink::weight_rows`] as
/// [`svp_tensor::gemm_to_sink`] computes it, so that gradient is never
/// stored (`weight_rows` is `None` only after
/// [`LayerUpdate::stored_gradients_only`]). Either way gives the same bits.
///
/// # Panics
/// Both methods panic if the parameters lie outside the layer's state, and
/// `apply` if the gradient's length differs, `weight_rows` if the weights
/// are not whole rows.
impl GradientSink for LayerUpdate<'_> {
    type Rows<'a>
        = WeightRows<'a>
    where
        Self: 'a;

    fn apply(&mut self, offset: usize, params: &mut [f32], grad: &[f32]) {
        #[cfg(feature = "clock")]
        let start = std::time::Instant::now();
        assert_eq!(params.len(), grad.len(), "optimizer: gradient length");
        let range = offset..offset + params.len();
        let rule = self.rule;
        let chunks = params.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK));
        // A rule without moments gets empty moment slices (a zip with the
        // empty state would stop at once).
        match &mut *self.moments {
            Moments::None => chunks.for_each(|(p, g)| apply_rule(rule, p, g, &mut [], &mut [])),
            Moments::Momentum(m) => {
                chunks.zip(m[range].par_chunks_mut(CHUNK)).for_each(|((p, g), m)| apply_rule(rule, p, g, m, &mut []))
            }
            Moments::F32 { m, v } => chunks
                .zip(m[range.clone()].par_chunks_mut(CHUNK))
                .zip(v[range].par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| apply_rule(rule, p, g, m, v)),
            Moments::Bf16 { m, v } => {
                let StepRule::Adam(adam) = rule else { unreachable!("only Adam's state is kept in bf16") };
                let noise_seed = self.noise_seed;
                chunks
                    .zip(m[range.clone()].par_chunks_mut(CHUNK))
                    .zip(v[range].par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, (((p, g), m), v))| {
                        apply_adam_bf16(adam, p, g, m, v, noise_seed, (offset + c * CHUNK) as u32)
                    })
            }
        }
        #[cfg(feature = "clock")]
        crate::UPDATE_NANOS.fetch_add(start.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// (Its time counts on the GEMM clock, not on the update clock.)
    fn weight_rows<'b>(&'b mut self, offset: usize, weights: &'b mut [f32], cols: usize) -> Option<WeightRows<'b>> {
        assert!(
            cols > 0 && weights.len().is_multiple_of(cols),
            "optimizer: weights of {} are not rows of {cols}",
            weights.len()
        );
        if !self.takes_tiles {
            return None;
        }
        let range = offset..offset + weights.len();
        let moments = match &mut *self.moments {
            Moments::None => RowMoments::None,
            Moments::Momentum(m) => RowMoments::Momentum(&mut m[range]),
            Moments::F32 { m, v } => RowMoments::F32 { m: &mut m[range.clone()], v: &mut v[range] },
            Moments::Bf16 { m, v } => {
                RowMoments::Bf16 { m: &mut m[range.clone()], v: &mut v[range], noise_seed: self.noise_seed }
            }
        };
        Some(WeightRows { rule: self.rule, params: weights, moments, offset, cols })
    }
}

/// Weights updated row piece by row piece from a gradient a GEMM hands over
/// ([`GradientSink::weight_rows`] of a [`LayerUpdate`]).
#[derive(Debug)]
pub struct WeightRows<'a> {
    rule: StepRule,
    params: &'a mut [f32],
    /// The moments of `params`.
    moments: RowMoments<'a>,
    /// Where `params` start in the layer (bf16 rounding noise is keyed by the place).
    offset: usize,
    cols: usize,
}

/// The part of a layer's [`Moments`] that a [`WeightRows`] updates.
#[derive(Debug)]
enum RowMoments<'a> {
    None,
    Momentum(&'a mut [f32]),
    F32 { m: &'a mut [f32], v: &'a mut [f32] },
    Bf16 { m: &'a mut [u16], v: &'a mut [u16], noise_seed: u32 },
}

impl svp_tensor::ProductSink for WeightRows<'_> {
    #[inline]
    fn take(&mut self, row: usize, col0: usize, grad: &[f32]) {
        let at = row * self.cols + col0;
        let range = at..at + grad.len();
        let params = &mut self.params[range.clone()];
        let rule = self.rule;
        match &mut self.moments {
            RowMoments::None => apply_rule(rule, params, grad, &mut [], &mut []),
            RowMoments::Momentum(m) => apply_rule(rule, params, grad, &mut m[range], &mut []),
            RowMoments::F32 { m, v } => apply_rule(rule, params, grad, &mut m[range.clone()], &mut v[range]),
            RowMoments::Bf16 { m, v, noise_seed } => {
                let StepRule::Adam(adam) = rule else { unreachable!("only Adam's state is kept in bf16") };
                let (m, v) = (&mut m[range.clone()], &mut v[range]);
                apply_adam_bf16(adam, params, grad, m, v, *noise_seed, (self.offset + at) as u32);
            }
        }
    }

    fn split_rows(self, at: usize) -> (Self, Self) {
        let cut = at * self.cols;
        let (p_top, p_bottom) = self.params.split_at_mut(cut);
        let (top, bottom) = match self.moments {
            RowMoments::None => (RowMoments::None, RowMoments::None),
            RowMoments::Momentum(m) => {
                let (a, b) = m.split_at_mut(cut);
                (RowMoments::Momentum(a), RowMoments::Momentum(b))
            }
            RowMoments::F32 { m, v } => {
                let ((m0, m1), (v0, v1)) = (m.split_at_mut(cut), v.split_at_mut(cut));
                (RowMoments::F32 { m: m0, v: v0 }, RowMoments::F32 { m: m1, v: v1 })
            }
            RowMoments::Bf16 { m, v, noise_seed } => {
                let ((m0, m1), (v0, v1)) = (m.split_at_mut(cut), v.split_at_mut(cut));
                (RowMoments::Bf16 { m: m0, v: v0, noise_seed }, RowMoments::Bf16 { m: m1, v: v1, noise_seed })
            }
        };
        let (rule, cols, offset) = (self.rule, self.cols, self.offset);
        (
            WeightRows { rule, params: p_top, moments: top, offset, cols },
            WeightRows { rule, params: p_bottom, moments: bottom, offset: offset + cut, cols },
        )
    }
}
