"""The bounds of `openalign serve`, in one light module (the command line reads its defaults from here without
loading the server): what one request may send or ask for, the work requests do at once, and how long and how
many connections waitress keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass

REQUEST_SECONDS = 30.0  # a request must arrive whole within this (an 11 MB upload at 3 Mbit/s); a proxy buffers slower
IDLE_SECONDS = 30  # a keep-alive connection with no request in progress
CONNECTION_LIMIT = 256


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for or send, and on the work requests do at once."""

    max_upload_bytes: int = 8 * 2**20  # a query image, before base64
    # Pixels decoded for a query image (a JPEG's after decoding at reduced scale): a 12-megapixel phone photo
    # passes; the model sees a few hundred pixels a side, so more only costs memory.
    max_pixels: int = 16_000_000
    max_concurrent_images: int = 2  # requests decoding an image at once; the others wait
    image_wait_seconds: float = 10.0  # then are answered 503
    max_text_characters: int = 2_000
    max_num_images: int = 1_000
    max_result_ids: int = 10_000
    max_metadata_ids: int = 1_000
    thumbnail_size: int = 256

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the base64 of the largest upload plus room for the other fields."""
        return 4 * math.ceil(self.max_upload_bytes / 3) + 64 * 1024
