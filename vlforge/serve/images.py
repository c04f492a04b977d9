"""Images from requests: `data:image/...;base64,` URIs (or bare base64), and http(s) URLs only when the
server allows fetching. Every check happens before pixels are decoded: the encoded size, the format,
and the pixel count read from the header (a decompression bomb is refused before it expands)."""
from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
import warnings
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from vlforge.config.serve import LimitsConfig
from vlforge.serve.errors import APIError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)?(?P<params>(;[\w=.-]+)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def image_bytes(url: str, param: str, limits: LimitsConfig, allow_remote: bool) -> bytes:
    """The encoded bytes an `image_url.url` (or an `image` field) names."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param}: an image is needed (a data: URI with base64 bytes)", param)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise APIError(400, f"{param}: remote image URLs are refused by this server (serve.allow_remote_images="
                                "false); send the image as a data: URI", param)
        return _fetch(url, param, limits)
    match = _DATA_URI.match(url[:256]) if url.startswith("data:") else None
    if url.startswith("data:"):
        if match is None or not match.group("b64"):
            raise APIError(400, f"{param}: a data: URI must be base64 (data:image/png;base64,...)", param)
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise APIError(415, f"{param}: the data: URI holds {mime}, not an image", param)
        payload = url[url.index(",") + 1:]
    else:
        payload = url
    # base64 inflates by 4/3: refuse before decoding what would exceed the limit.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise APIError(413, f"{param}: the image is over serve.limits.max_image_bytes={limits.max_image_bytes}", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: not valid base64", param) from None


def _fetch(url: str, param: str, limits: LimitsConfig) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(limits.max_image_bytes + 1)
    except Exception as err:  # OSError, http.client.InvalidURL, UnicodeError, ValueError: the URL's fault
        raise APIError(400, f"{param}: could not fetch {url}: {err}", param) from None
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{param}: the image is over serve.limits.max_image_bytes={limits.max_image_bytes}", param)
    return data


def decode_image(data: bytes, param: str, limits: LimitsConfig) -> Image.Image:
    """An RGB PIL image, or a 4xx naming `param`: not an image, an unsupported format, too many pixels."""
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{param}: the image is over serve.limits.max_image_bytes={limits.max_image_bytes}", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise APIError(400, f"{param}: the image is {width}x{height} = {width * height} pixels, over "
                                    f"serve.limits.max_image_pixels={limits.max_image_pixels}", param)
            if width < 1 or height < 1:
                raise APIError(400, f"{param}: the image is empty ({width}x{height})", param)
            if max(width, height) > limits.max_aspect_ratio * min(width, height):
                raise APIError(400, f"{param}: the image is {width}x{height}, longer than serve.limits.max_aspect_ratio="
                                    f"{limits.max_aspect_ratio:g} times its width", param)
            image.load()
            return image.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise APIError(400, f"{param}: refused as a decompression bomb ({err})", param) from None
    except UnidentifiedImageError:  # its message names the in-memory buffer, which tells the user nothing
        raise APIError(400, f"{param}: not a readable image (no image format recognised in its bytes)", param) from None
    except Exception as err:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        raise APIError(400, f"{param}: not a readable image ({type(err).__name__}: {err})", param) from None


def load_image(url: str, param: str, limits: LimitsConfig, allow_remote: bool,
               transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The model's input for one request image: decoded under the limits, then the recipe's eval transform."""
    image = decode_image(image_bytes(url, param, limits, allow_remote), param, limits)
    try:
        return transform(image)
    except Exception as err:
        raise APIError(400, f"{param}: the image cannot be prepared for the model ({err})", param) from None
