//! The kind of file a mask belongs to, an image or a video. It only names the file in errors
//! ("video clip.mp4"). A leaf: the error type and the geometry both use it, it uses neither.

/// What a mask is laid onto; named in an aspect mismatch so a video's mask says "video".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    Image,
    Video,
}

impl Media {
    pub fn as_str(self) -> &'static str {
        match self {
            Media::Image => "image",
            Media::Video => "video",
        }
    }
}

impl std::fmt::Display for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is neither "image" nor "video" (the core's `Error` turns it into an invalid argument).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("media must be \"image\" or \"video\", got {0:?}")]
pub struct UnknownMedia(pub String);

impl std::str::FromStr for Media {
    type Err = UnknownMedia;

    fn from_str(s: &str) -> Result<Self, UnknownMedia> {
        match s {
            "image" => Ok(Media::Image),
            "video" => Ok(Media::Video),
            _ => Err(UnknownMedia(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_parses_its_two_words_only() {
        assert_eq!("image".parse::<Media>().unwrap(), Media::Image);
        assert_eq!("video".parse::<Media>().unwrap(), Media::Video);
        let err = "Video".parse::<Media>().unwrap_err();
        assert_eq!(err.to_string(), "media must be \"image\" or \"video\", got \"Video\"");
    }
}
