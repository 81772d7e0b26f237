//! Plain pixel buffers shared by every stage: no image-crate types cross module borders.

/// A row-major pixel buffer: `height` rows of `width * channels` interleaved samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane<T> {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub data: Vec<T>,
}

impl<T: Copy> Plane<T> {
    pub fn new(width: u32, height: u32, channels: usize, data: Vec<T>) -> Self {
        assert_eq!(data.len(), width as usize * height as usize * channels, "plane buffer size");
        Plane { width, height, channels, data }
    }

    pub fn filled(width: u32, height: u32, channels: usize, value: T) -> Self {
        Plane::new(width, height, channels, vec![value; width as usize * height as usize * channels])
    }

    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The same plane with every sample mapped through `f`.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Plane<U> {
        Plane::new(self.width, self.height, self.channels, self.data.iter().map(|&v| f(v)).collect())
    }

    pub fn row(&self, y: usize) -> &[T] {
        let stride = self.width as usize * self.channels;
        &self.data[y * stride..(y + 1) * stride]
    }
}

/// A sample type the resize kernels work on (8- and 16-bit unsigned).
pub trait Sample: Copy + Default + Send + Sync + 'static {
    /// The value meaning "full weight" / "opaque".
    const MAX: u32;
    fn to_f32(self) -> f32;
    fn to_u32(self) -> u32;
    /// OpenCV's `saturate_cast` from float: round half to even, then clamp.
    fn from_f32_rounded(v: f32) -> Self;
    fn from_u32_saturating(v: u32) -> Self;
}

/// The nearest integer to `v` (ties to even, as OpenCV's `cvRound`) after clamping to
/// `[0, max]`, without a libm call (`rintf` is not inlined on baseline x86-64) or a saturating
/// float-to-int cast, both of which keep loops from vectorising: adding 1.5 * 2^23 leaves the
/// rounded integer in the low mantissa bits under the default rounding mode (for |v| < 2^22).
#[inline]
fn round_clamped(v: f32, max: f32) -> u32 {
    const MAGIC: f32 = 12_582_912.0;
    let v = if v > max { max } else { v };
    let v = if v > 0.0 { v } else { 0.0 }; // NaN becomes 0 here too
    (v + MAGIC).to_bits() - MAGIC.to_bits()
}

impl Sample for u8 {
    const MAX: u32 = 255;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn from_f32_rounded(v: f32) -> Self {
        round_clamped(v, 255.0) as u8
    }
    fn from_u32_saturating(v: u32) -> Self {
        v.min(255) as u8
    }
}

impl Sample for u16 {
    const MAX: u32 = 65535;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn from_f32_rounded(v: f32) -> Self {
        round_clamped(v, 65535.0) as u16
    }
    fn from_u32_saturating(v: u32) -> Self {
        v.min(65535) as u16
    }
}

/// A one-channel mask at its native bit depth. 16-bit masks keep their precision all the way
/// to the latent grid (weight = v / 65535) instead of being clipped to 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub enum Mask {
    Eight(Plane<u8>),
    Sixteen(Plane<u16>),
}

impl Mask {
    pub fn size(&self) -> (u32, u32) {
        match self {
            Mask::Eight(p) => p.size(),
            Mask::Sixteen(p) => p.size(),
        }
    }

    pub fn is_sixteen_bit(&self) -> bool {
        matches!(self, Mask::Sixteen(_))
    }

    /// 8-bit view: 16-bit values are rounded to the nearest 8-bit level (`round(v / 257)`).
    pub fn to_u8(&self) -> Plane<u8> {
        match self {
            Mask::Eight(p) => p.clone(),
            Mask::Sixteen(p) => p.map(|v| ((v as u32 + 128) / 257) as u8),
        }
    }

    /// 16-bit view: 8-bit values are widened exactly (`v * 257`).
    pub fn to_u16(&self) -> Plane<u16> {
        match self {
            Mask::Eight(p) => p.map(|v| v as u16 * 257),
            Mask::Sixteen(p) => p.clone(),
        }
    }

    /// Weights in [0, 1] as float32: `v / 255` or `v / 65535`, the division done in f32 as
    /// `torch.from_numpy(mask).float() / 255.0` does.
    pub fn to_unit_f32(&self) -> Plane<f32> {
        match self {
            Mask::Eight(p) => p.map(|v| v as f32 / 255.0),
            Mask::Sixteen(p) => p.map(|v| v as f32 / 65535.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_like_cv_round() {
        for (v, r) in
            [(0.5, 0u8), (1.5, 2), (2.5, 2), (3.5, 4), (254.5, 254), (-3.0, 0), (300.0, 255), (7.49, 7)]
        {
            assert_eq!(u8::from_f32_rounded(v), r, "{v}");
        }
        assert_eq!(u16::from_f32_rounded(65534.5), 65534);
        for i in 0..200_000 {
            let v = i as f32 * 0.3271;
            assert_eq!(u16::from_f32_rounded(v) as f32, v.round_ties_even().min(65535.0), "{v}");
        }
    }
}
