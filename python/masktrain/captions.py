"""Caption files: ``{stem}{caption_extension}`` beside the media or in a caption directory."""


def normalize_caption_extension(extension: str) -> str:
    """``"txt"`` means ``".txt"``: the guide always writes the dot, users sometimes do not."""
    return extension if not extension or extension.startswith(".") else "." + extension
