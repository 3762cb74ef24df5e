"""Turning user input (folders, paths, zip archives, PIL images, numpy arrays) into image sources.

An :class:`ImageSource` is a small picklable sequence of images (``len``, ``name(i)``, ``load(i)``,
``fingerprint()``) that DataLoader workers can decode in parallel. Every decoded image is 8-bit
RGB; anything that cannot be used raises :class:`BadImageError` naming the file and what is wrong
with it, from ``load(i)`` of that one image, so that ``skip_bad`` can always go on.

Hostile input cannot take the machine down: only regular files are read, within
``dn2.config`` ``max_file_bytes``; zip members are checked (size, ratio, method, encryption) and
read as bounded streams; an image is decoded only if its header shows it fits ``image_memory``;
names are always printable. The modules:

- :mod:`~dn2.images.errors`: :class:`BadImageError`, :func:`printable`;
- :mod:`~dn2.images.files`: listing folders, reading files safely (symlink policy there);
- :mod:`~dn2.images.archives`: listing and reading zip archives;
- :mod:`~dn2.images.decode`: :func:`open_image`, :func:`array_to_image`, :func:`resize_and_crop`;
- :mod:`~dn2.images.sources`: the sources and the registry behind :func:`as_source`.

Example:
    >>> import numpy as np
    >>> from dn2.images import as_source
    >>> src = as_source(np.zeros((3, 16, 16), np.uint8))
    >>> len(src), src.name(0), src.load(0).mode
    (3, 'array[0]', 'RGB')
"""

from .archives import ZipArchive, image_members, list_zip_images
from .decode import DECODED_FORMATS, RESAMPLE, array_to_image, open_image, resize_and_crop, to_rgb
from .errors import BadImageError, printable
from .files import (
    IMAGE_EXTENSIONS,
    file_digest,
    is_hidden,
    is_image_name,
    list_image_files,
    open_regular,
    read_file,
    read_limited,
)
from .sources import (
    SOURCE_KINDS,
    ArraySource,
    ConcatSource,
    FileSource,
    ImageSource,
    PILSource,
    ZipSource,
    as_source,
    register_source,
)

__all__ = [
    "DECODED_FORMATS",
    "IMAGE_EXTENSIONS",
    "RESAMPLE",
    "SOURCE_KINDS",
    "ArraySource",
    "BadImageError",
    "ConcatSource",
    "FileSource",
    "ImageSource",
    "PILSource",
    "ZipArchive",
    "ZipSource",
    "array_to_image",
    "as_source",
    "file_digest",
    "image_members",
    "is_hidden",
    "is_image_name",
    "list_image_files",
    "list_zip_images",
    "open_image",
    "open_regular",
    "printable",
    "read_file",
    "read_limited",
    "register_source",
    "resize_and_crop",
    "to_rgb",
]
