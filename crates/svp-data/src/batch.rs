//! Shuffling and batch gathering.

use crate::Dataset;
use serde::{Deserialize, Serialize};
use svp_rng::{Purpose, Stream, StreamKey};

/// Random changes to training images, drawn anew for every sample in every
/// epoch from the stream `(seed, Augment, epoch, sample)`: so a run stays
/// bit-identical, on any thread count and when resumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Largest shift, in pixels, up/down and left/right (each drawn
    /// uniformly from `-shift..=shift`; what moves in is background, 0).
    #[serde(default)]
    pub shift: usize,
    /// Mirror left-right with probability 1/2.
    #[serde(default)]
    pub flip: bool,
}

impl Augment {
    /// Whether it changes anything.
    pub fn is_active(&self) -> bool {
        self.shift > 0 || self.flip
    }
}

/// Visits a data set in seeded random order, one batch at a time, gathering
/// into caller-owned buffers.
#[derive(Clone, Debug)]
pub struct Batcher {
    order: Vec<u32>,
    batch_size: usize,
    table: [f32; 256],
    augment: Augment,
    /// The epoch's seed and number, for the augmentation streams.
    epoch: (u64, u64),
}

impl Batcher {
    /// A batcher over `len` samples that turns a pixel byte `p` into the
    /// input value `pixel_values[p]` (the network's input normalization,
    /// `svp_net::Normalization::table`).
    ///
    /// # Panics
    /// If `batch_size` is zero (configs are validated before this).
    pub fn new(len: usize, batch_size: usize, pixel_values: [f32; 256]) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        Self {
            order: (0..len as u32).collect(),
            batch_size,
            table: pixel_values,
            augment: Augment::default(),
            epoch: (0, 0),
        }
    }

    /// Augments every gathered image from now on (training only: an
    /// evaluation gathers without).
    pub fn with_augment(mut self, augment: Augment) -> Self {
        self.augment = augment;
        self
    }

    /// Orders the samples for `epoch` of the model with `seed` (Fisher-Yates
    /// over the stream `(seed, Shuffle, epoch)`), or in file order if `shuffle`
    /// is false.
    pub fn start_epoch(&mut self, seed: u64, epoch: u64, shuffle: bool) {
        self.epoch = (seed, epoch);
        for (i, o) in self.order.iter_mut().enumerate() {
            *o = i as u32;
        }
        if shuffle {
            let mut s = Stream::new(StreamKey::new(seed, Purpose::Shuffle, epoch, 0, 0));
            for i in (1..self.order.len()).rev() {
                let j = s.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
        }
    }

    /// Number of batches per epoch (the last may be short).
    pub fn batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The sample indices of batch `b` in the current order.
    pub fn indices(&self, b: usize) -> &[u32] {
        let start = b * self.batch_size;
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }

    /// Gathers batch `b` of `data` into `x` (rows x features) and `y`; returns
    /// the number of rows.
    pub fn gather(&self, data: &Dataset, b: usize, x: &mut [f32], y: &mut [u32]) -> usize {
        let f = data.features();
        let idx = self.indices(b);
        for ((&i, row), label) in idx.iter().zip(x.chunks_exact_mut(f)).zip(y.iter_mut()) {
            if self.augment.is_active() {
                self.gather_augmented(data, i as usize, row);
            } else {
                for (o, &p) in row.iter_mut().zip(data.image(i as usize)) {
                    *o = self.table[p as usize];
                }
            }
            *label = data.labels[i as usize] as u32;
        }
        idx.len()
    }

    /// Sample `i` shifted (and maybe mirrored) as its stream says, into `row`.
    fn gather_augmented(&self, data: &Dataset, i: usize, row: &mut [f32]) {
        let (h, w) = data.image_shape;
        let (seed, epoch) = self.epoch;
        let mut s = Stream::new(StreamKey::new(seed, Purpose::Augment, epoch, i as u64, 0));
        let span = 2 * self.augment.shift as u64 + 1;
        let dy = s.below(span) as isize - self.augment.shift as isize;
        let dx = s.below(span) as isize - self.augment.shift as isize;
        let flip = self.augment.flip && s.below(2) == 1;
        let image = data.image(i);
        let background = self.table[0];
        // Columns `c` of a row that read source column `c - dx`.
        let (c0, c1) = (dx.max(0) as usize, (w as isize + dx).min(w as isize).max(0) as usize);
        for (r, out_row) in row.chunks_exact_mut(w).enumerate() {
            let src_r = r as isize - dy;
            if !(0..h as isize).contains(&src_r) || c0 >= c1 {
                out_row.fill(background);
                continue;
            }
            let src = &image[src_r as usize * w..][..w];
            out_row[..c0].fill(background);
            let from = (c0 as isize - dx) as usize;
            for (o, &p) in out_row[c0..c1].iter_mut().zip(&src[from..]) {
                *o = self.table[p as usize];
            }
            out_row[c1..].fill(background);
            // A mirrored image is the shifted one read right to left.
            if flip {
                out_row.reverse();
            }
        }
    }
}

/// Holds out `fraction` of `data` for validation: a seeded random choice
/// (the stream `(seed, Augment, u64::MAX)`), in file order in both parts.
/// Returns the validation part; `data` keeps the rest.
pub fn split_validation(data: &mut Dataset, fraction: f64, seed: u64) -> Dataset {
    let n = data.len();
    let held = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = Stream::new(StreamKey::new(seed, Purpose::Augment, u64::MAX, 0, 0));
    for i in (1..n).rev() {
        order.swap(i, s.below(i as u64 + 1) as usize);
    }
    let mut is_held = vec![false; n];
    order[..held].iter().for_each(|&i| is_held[i] = true);
    let f = data.features();
    let (mut train, mut val) = (
        Dataset { images: Vec::new(), labels: Vec::new(), image_shape: data.image_shape },
        Dataset { images: Vec::new(), labels: Vec::new(), image_shape: data.image_shape },
    );
    for (i, &held) in is_held.iter().enumerate() {
        let part = if held { &mut val } else { &mut train };
        part.images.extend_from_slice(data.image(i));
        part.labels.push(data.labels[i]);
    }
    debug_assert_eq!(train.images.len() + val.images.len(), n * f);
    *data = train;
    val
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shift moves the picture and lets background (0) in; a flip mirrors
    /// it; both are a function of (seed, epoch, sample), not of the batch.
    #[test]
    fn augmentation_shifts_and_flips_by_the_stream() {
        let (h, w) = (5, 6);
        let image: Vec<u8> = (0..h * w).map(|v| 1 + v as u8).collect();
        let data = Dataset { images: image.repeat(40), labels: vec![0; 40], image_shape: (h, w) };
        let table: [f32; 256] = std::array::from_fn(|p| p as f32 / 255.0);
        let plain = Batcher::new(40, 40, table);
        let augmented = Batcher::new(40, 40, table).with_augment(Augment { shift: 2, flip: true });
        let (mut x, mut y) = (vec![0.0; 40 * h * w], vec![0; 40]);
        let mut seen_shift = false;
        for epoch in 0..3 {
            let mut b = augmented.clone();
            b.start_epoch(9, epoch, true);
            b.gather(&data, 0, &mut x, &mut y);
            for (k, &i) in b.indices(0).iter().enumerate() {
                let row = &x[k * h * w..(k + 1) * h * w];
                // The one transformation that explains the row: find (dy, dx, flip).
                let explains = |dy: isize, dx: isize, flip: bool| {
                    (0..h).all(|r| {
                        (0..w).all(|c| {
                            let cc = if flip { w - 1 - c } else { c };
                            let (sr, sc) = (r as isize - dy, cc as isize - dx);
                            let inside = (0..h as isize).contains(&sr) && (0..w as isize).contains(&sc);
                            let want = if inside { image[sr as usize * w + sc as usize] } else { 0 };
                            row[r * w + c] == table[want as usize]
                        })
                    })
                };
                let found = (-2..=2).flat_map(|dy| (-2..=2).flat_map(move |dx| [(dy, dx, false), (dy, dx, true)]));
                let found: Vec<_> = found.filter(|&(dy, dx, f)| explains(dy, dx, f)).collect();
                assert_eq!(found.len(), 1, "epoch {epoch}, sample {i}: {found:?}");
                seen_shift |= found[0] != (0, 0, false);
            }
            // Batches of another size see each sample transformed the same.
            let mut small = Batcher::new(40, 7, table).with_augment(Augment { shift: 2, flip: true });
            small.start_epoch(9, epoch, true);
            let (mut xs, mut ys) = (vec![0.0; 7 * h * w], vec![0; 7]);
            let n = small.gather(&data, 2, &mut xs, &mut ys);
            for (k, &i) in small.indices(2).iter().enumerate().take(n) {
                let at = b.indices(0).iter().position(|&j| j == i).unwrap();
                assert_eq!(xs[k * h * w..(k + 1) * h * w], x[at * h * w..(at + 1) * h * w], "sample {i}");
            }
        }
        assert!(seen_shift);
        // Without augmentation the rows are the images.
        let mut b = plain.clone();
        b.start_epoch(9, 0, false);
        b.gather(&data, 0, &mut x, &mut y);
        assert!(x[..h * w].iter().zip(&image).all(|(a, &b)| *a == table[b as usize]));
    }

    #[test]
    fn a_validation_split_is_seeded_and_disjoint() {
        let mut data = Dataset {
            images: (0..100u8).flat_map(|v| [v, v]).collect(),
            labels: (0..100u8).collect(),
            image_shape: (1, 2),
        };
        let mut again = data.clone();
        let val = split_validation(&mut data, 0.1, 4);
        assert_eq!((data.len(), val.len()), (90, 10));
        let mut all: Vec<u8> = data.labels.iter().chain(&val.labels).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<u8>>());
        assert!(val.labels.iter().zip(val.images.chunks(2)).all(|(&l, img)| img == [l, l]), "images follow labels");
        assert_eq!(split_validation(&mut again, 0.1, 4), val, "the same seed holds out the same samples");
    }

    fn tiny() -> Dataset {
        Dataset {
            images: (0..40).map(|v| v as u8 * 6).collect(),
            labels: (0..10).map(|v| v % 3).collect(),
            image_shape: (2, 2),
        }
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let d = tiny();
        let mut b = Batcher::new(d.len(), 4, [0.0; 256]);
        b.start_epoch(1, 0, true);
        let first: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        b.start_epoch(1, 1, true);
        let second: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        assert_ne!(first, second);
        b.start_epoch(1, 0, true);
        let again: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        assert_eq!(first, again);
        assert_eq!(b.batches(), 3);
        assert_eq!(b.indices(2).len(), 2);
    }

    #[test]
    fn gather_looks_pixels_up() {
        let d = tiny();
        let table: [f32; 256] = std::array::from_fn(|p| (p as f32 / 255.0 - 0.5) / 0.25);
        let mut b = Batcher::new(d.len(), 4, table);
        b.start_epoch(0, 0, false);
        let mut x = vec![0.0; 16];
        let mut y = vec![0; 4];
        assert_eq!(b.gather(&d, 2, &mut x, &mut y), 2);
        assert_eq!(y[..2], [2, 0]);
        assert_eq!(x[0], table[d.image(8)[0] as usize]);
    }
}
