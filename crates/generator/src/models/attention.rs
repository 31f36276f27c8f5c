//! What the qwen2 and llama copies share instead of candle-transformers'
//! per-token copies: a KV cache that is written in place, and grouped-query
//! attention that reads each key/value head once for all its query heads.
//!
//! candle-transformers 0.11 appends to the cache with `Tensor::cat` (a fresh
//! buffer and a copy of the whole cache per layer per token) and then copies it
//! again `n_head / n_kv_head` times (`repeat_kv`). On SmolLM2 after a
//! 512-token prompt that was ~25 MB of copying per decoded token.

use candle_core::{Result, Tensor};
use ragd_kernels::cached_attention::CachedAttention;

/// Positions added when the cache grows (at least; it grows by half its size).
const GROW: usize = 256;

/// One layer's keys and values, `(batch, kv_heads, capacity, head_dim)`, of
/// which the first `len` positions are valid.
#[derive(Debug)]
pub(crate) struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// A clone owns its buffers (the cache is written in place, so a shared one
/// would let two generations overwrite each other's positions).
impl Clone for KvCache {
    fn clone(&self) -> Self {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        match (copy(&self.k), copy(&self.v)) {
            (Ok(k), Ok(v)) => Self {
                k,
                v,
                len: self.len,
            },
            // Copying a CPU tensor cannot fail short of allocation failure;
            // an empty cache is still correct (the next prompt is read again).
            _ => Self::new(),
        }
    }
}

impl KvCache {
    pub(crate) fn new() -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::new();
    }

    /// Writes `k`, `v` (`(batch, kv_heads, seq, head_dim)`) at position `pos`
    /// (forgetting anything from `pos` on) and returns views of positions
    /// `0..pos + seq`.
    pub(crate) fn append(
        &mut self,
        pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if pos > self.len {
            candle_core::bail!(
                "KV cache holds {} positions, cannot write at {pos}",
                self.len
            )
        }
        let (b, heads, seq, dim) = k.dims4()?;
        let need = pos + seq;
        let capacity = match &self.k {
            Some(t) => t.dim(2)?,
            None => 0,
        };
        if need > capacity {
            let new_capacity = need
                .max(capacity + capacity / 2)
                .max(GROW)
                .next_multiple_of(64);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((b, heads, new_capacity, dim), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if pos > 0 {
                        t.slice_set(&old.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(t)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            candle_core::bail!("KV cache buffers missing")
        };
        kb.slice_set(&k.contiguous()?, 2, pos)?;
        vb.slice_set(&v.contiguous()?, 2, pos)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// Scaled dot-product attention for `q` `(b, n_head, s, d)` over `k`, `v`
/// `(b, n_kv_head, L, d)`, with query heads grouped by the key/value head they
/// read (head `h` reads `h / (n_head / n_kv_head)`, as in `repeat_kv`).
/// `mask` is `(s, L)`, non-zero where a query must not see a key.
pub(crate) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    neg_inf: &Tensor,
) -> Result<Tensor> {
    let (b, n_head, s, d) = q.dims4()?;
    let (_, n_kv, l, _) = k.dims4()?;
    let rep = n_head / n_kv;
    // One position (decoding, a drafted token checked alone) with no mask:
    // over the cache in place (`ragd_kernels::cached_attention`).
    if s == 1
        && mask.is_none()
        && q.dtype() == candle_core::DType::F32
        && d.is_multiple_of(16)
        && CachedAttention::available()
    {
        let op = CachedAttention {
            scale: 1.0 / (d as f32).sqrt(),
        };
        return q.contiguous()?.apply_op3_no_bwd(k, v, &op);
    }
    // Scale, mask and softmax in one pass (`ragd_kernels::softmax`), where
    // the mask gives each query a range of keys (causal, sliding window) and
    // the scores are f32; else candle's passes.
    let visible = match mask {
        None => Some(None),
        Some(mask) => visible_ranges(mask, s, l)?.map(Some),
    };
    if let Some(Some(ranges)) = &visible {
        if s >= 2 * QUERY_BLOCK && q.dtype() == candle_core::DType::F32 {
            return blocked_attention(q, k, v, ranges);
        }
    }
    // (b, n_kv, rep·s, d): the query heads of one group stacked as rows.
    let q = q.contiguous()?.reshape((b, n_kv, rep * s, d))?;
    let att = q.matmul(&k.t()?)?;
    let att = match visible {
        Some(visible) if att.dtype() == candle_core::DType::F32 => {
            ragd_kernels::softmax::scaled_masked_softmax(&att, 1.0 / (d as f32).sqrt(), s, visible)?
        }
        _ => {
            let att = (att / (d as f64).sqrt())?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let att = att.reshape((b, n_kv, rep, s, l))?;
                    let mask = mask.broadcast_as(att.shape())?;
                    let att = mask.where_cond(
                        &neg_inf.to_dtype(att.dtype())?.broadcast_as(att.shape())?,
                        &att,
                    )?;
                    att.reshape((b, n_kv, rep * s, l))?
                }
            };
            candle_nn::ops::softmax_last_dim(&att)?
        }
    };
    let y = att.matmul(v)?;
    y.reshape((b, n_head, s, d))
}

/// Query rows per block in [`blocked_attention`].
const QUERY_BLOCK: usize = 128;

/// [`grouped_attention`] for a long prompt, by blocks of [`QUERY_BLOCK`]
/// queries, each over only the keys some query of the block sees: a causal
/// mask hides about half of the scores, and computing them all (then
/// exponentiating them to 0 and multiplying the zeros by the values) was
/// attention's whole cost twice over. For a 1,024-token prompt in blocks of
/// 128 the scores computed are 56 % of the square.
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ranges: &ragd_kernels::softmax::VisibleKeys,
) -> Result<Tensor> {
    let (b, n_head, s, d) = q.dims4()?;
    let n_kv = k.dim(1)?;
    let rep = n_head / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let q = q.contiguous()?.reshape((b, n_kv, rep, s, d))?;
    let mut ys = Vec::with_capacity(s.div_ceil(QUERY_BLOCK));
    for q0 in (0..s).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(s - q0);
        let block = &ranges[q0..q0 + rows];
        let lo = block.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = block.iter().map(|r| r.1).max().unwrap_or(lo).max(lo);
        let shifted: ragd_kernels::softmax::VisibleKeys =
            block.iter().map(|&(a, z)| (a - lo, z - lo)).collect();
        let (lo, keys) = (lo as usize, (hi - lo) as usize);
        let qb = q
            .narrow(3, q0, rows)?
            .contiguous()?
            .reshape((b, n_kv, rep * rows, d))?;
        let kb = k.narrow(2, lo, keys)?.contiguous()?;
        let att = qb.matmul(&kb.t()?)?;
        let att = ragd_kernels::softmax::scaled_masked_softmax(&att, scale, rows, Some(shifted))?;
        let y = att.matmul(&v.narrow(2, lo, keys)?.contiguous()?)?;
        ys.push(y.reshape((b, n_kv, rep, rows, d))?);
    }
    Tensor::cat(&ys, 3)?.reshape((b, n_head, s, d))
}

/// Each query's visible keys as one range `lo..hi`, from a `(queries, keys)`
/// mask (1 = hidden); `None` when some row's visible keys are not one range.
fn visible_ranges(
    mask: &Tensor,
    queries: usize,
    keys: usize,
) -> Result<Option<ragd_kernels::softmax::VisibleKeys>> {
    if mask.dims() != [queries, keys] {
        return Ok(None);
    }
    let rows = mask.to_dtype(candle_core::DType::U8)?.to_vec2::<u8>()?;
    let mut ranges = Vec::with_capacity(queries);
    for row in &rows {
        let lo = row.iter().position(|&m| m == 0).unwrap_or(keys);
        let hi = row.iter().rposition(|&m| m == 0).map_or(lo, |i| i + 1);
        if row[lo..hi].iter().any(|&m| m != 0) {
            return Ok(None);
        }
        ranges.push((lo as u32, hi as u32));
    }
    Ok(Some(ranges.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(shape: (usize, usize, usize, usize), seed: f32) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// The grouped form equals attention over `repeat_kv`-expanded heads, with
    /// and without a causal mask, and the cache returns what was written.
    #[test]
    fn grouped_attention_matches_repeated_heads() -> Result<()> {
        let dev = Device::Cpu;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &dev)?;
        let (n_head, n_kv, d) = (6, 2, 8);
        let mut cache = KvCache::new();
        let mut pos = 0;
        for (step, s) in [5usize, 1, 1, 3].into_iter().enumerate() {
            let q = ramp((1, n_head, s, d), step as f32)?;
            let k = ramp((1, n_kv, s, d), 10.0 + step as f32)?;
            let v = ramp((1, n_kv, s, d), 20.0 + step as f32)?;
            let (kc, vc) = cache.append(pos, &k, &v)?;
            assert_eq!(kc.dims(), &[1, n_kv, pos + s, d]);
            let last: Vec<f32> = kc.narrow(2, pos, s)?.flatten_all()?.to_vec1()?;
            assert_eq!(last, k.flatten_all()?.to_vec1::<f32>()?);
            let mask = (s > 1)
                .then(|| candle_transformers::utils::build_causal_mask(s, pos, &dev))
                .transpose()?;
            let got = grouped_attention(&q, &kc, &vc, mask.as_ref(), &neg_inf)?;

            let kr = candle_transformers::utils::repeat_kv(kc.contiguous()?, n_head / n_kv)?;
            let vr = candle_transformers::utils::repeat_kv(vc.contiguous()?, n_head / n_kv)?;
            let att = (q.matmul(&kr.t()?)? / (d as f64).sqrt())?;
            let att = match &mask {
                None => att,
                Some(m) => {
                    let m = m.broadcast_as(att.shape())?;
                    m.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?
                }
            };
            let want = candle_nn::ops::softmax_last_dim(&att)?.matmul(&vr)?;
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "step {step}: max difference {diff}");
            pos += s;
        }
        // A clone is independent: writing to it leaves the original alone.
        let mut fork = cache.clone();
        let before: Vec<f32> = cache
            .append(
                pos,
                &ramp((1, n_kv, 1, d), 1.0)?,
                &ramp((1, n_kv, 1, d), 2.0)?,
            )?
            .0
            .flatten_all()?
            .to_vec1()?;
        fork.append(
            pos,
            &ramp((1, n_kv, 1, d), 3.0)?,
            &ramp((1, n_kv, 1, d), 4.0)?,
        )?;
        let after: Vec<f32> = cache
            .k
            .as_ref()
            .expect("buffer")
            .narrow(2, 0, pos + 1)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(before, after);
        // Writing past the end is an error, not a panic.
        assert!(cache
            .append(
                pos + 5,
                &ramp((1, n_kv, 1, d), 0.0)?,
                &ramp((1, n_kv, 1, d), 0.0)?
            )
            .is_err());
        Ok(())
    }

    #[test]
    fn the_cache_rewinds_to_an_earlier_position() -> Result<()> {
        let mut cache = KvCache::new();
        let k = ramp((1, 1, 4, 2), 0.0)?;
        cache.append(0, &k, &k)?;
        let (kc, _) = cache.append(2, &ramp((1, 1, 1, 2), 5.0)?, &ramp((1, 1, 1, 2), 5.0)?)?;
        assert_eq!(kc.dim(2)?, 3);
        Ok(())
    }

    /// A long prompt, attended by blocks of queries over the keys each block
    /// sees, equals attention over all keys under the mask: causal from the
    /// start, causal after cached positions, and with a sliding window.
    #[test]
    fn blocked_attention_matches_the_whole_masked_square() -> Result<()> {
        let dev = Device::Cpu;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &dev)?;
        let (n_head, n_kv, d) = (4, 2, 16);
        let window = |s: usize, pos: usize, w: usize| -> Result<Tensor> {
            let keys = pos + s;
            let m: Vec<u8> = (0..s)
                .flat_map(|i| (0..keys).map(move |j| u8::from(j > pos + i || pos + i - j >= w)))
                .collect();
            Tensor::from_slice(&m, (s, keys), &dev)
        };
        for (s, pos, w) in [(300, 0, None), (290, 70, None), (333, 40, Some(100))] {
            let q = ramp((1, n_head, s, d), 1.0)?;
            let k = ramp((1, n_kv, pos + s, d), 2.0)?;
            let v = ramp((1, n_kv, pos + s, d), 3.0)?;
            let mask = match w {
                None => candle_transformers::utils::build_causal_mask(s, pos, &dev)?,
                Some(w) => window(s, pos, w)?,
            };
            assert!(s >= 2 * QUERY_BLOCK);
            let got = grouped_attention(&q, &k, &v, Some(&mask), &neg_inf)?;
            let kr = candle_transformers::utils::repeat_kv(k.clone(), n_head / n_kv)?;
            let vr = candle_transformers::utils::repeat_kv(v.clone(), n_head / n_kv)?;
            let att = (q.matmul(&kr.t()?)? / (d as f64).sqrt())?;
            let m = mask.broadcast_as(att.shape())?;
            let att = m.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?;
            let want = candle_nn::ops::softmax_last_dim(&att)?.matmul(&vr)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "{s} queries after {pos}: max difference {diff}"
            );
        }
        Ok(())
    }
}
