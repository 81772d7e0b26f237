//! Truncated-JPEG detection. The JPEG decoder fills a cut-off scan with grey and reports
//! success, which would cache a half-grey photo without a word; PIL refuses such files
//! ("image file is truncated"). This walks the marker structure and requires the EOI marker
//! after the last scan.

/// True when the JPEG stream in `bytes` reaches its end-of-image marker.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    // SOI
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return false;
    }
    let mut pos = 2;
    loop {
        // Find the next marker: 0xFF followed by a code (fill bytes 0xFF may repeat).
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos) else {
            return false;
        };
        pos += 1;
        match code {
            0xD9 => return true,            // EOI
            0x01 | 0xD0..=0xD7 => continue, // TEM, RSTn: no length
            _ => {
                let Some(len) = bytes.get(pos..pos + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                else {
                    return false;
                };
                if len < 2 || pos + len > bytes.len() {
                    return false;
                }
                pos += len;
                if code == 0xDA {
                    // Entropy-coded data: runs until a 0xFF that is neither stuffing (FF 00)
                    // nor a restart marker.
                    loop {
                        while pos < bytes.len() && bytes[pos] != 0xFF {
                            pos += 1;
                        }
                        match bytes.get(pos + 1) {
                            None => return false,
                            Some(0x00) | Some(0xD0..=0xD7) | Some(0xFF) => {
                                pos += if bytes[pos + 1] == 0xFF { 1 } else { 2 }
                            }
                            Some(_) => break,
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_jpeg() -> Vec<u8> {
        let mut bytes = Vec::new();
        let image = image::RgbImage::from_fn(32, 24, |x, y| image::Rgb([(x * 8) as u8, (y * 10) as u8, 128]));
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).unwrap();
        bytes
    }

    #[test]
    fn complete_and_truncated() {
        let bytes = tiny_jpeg();
        assert!(jpeg_is_complete(&bytes));
        for cut in [bytes.len() - 1, bytes.len() - 2, bytes.len() * 3 / 4, bytes.len() / 2, 10, 3] {
            assert!(!jpeg_is_complete(&bytes[..cut]), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0u8; 100]);
        assert!(jpeg_is_complete(&padded), "trailing bytes after EOI are fine");
    }
}
