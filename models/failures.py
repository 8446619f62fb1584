"""Why an input could not be classified, as a category an analyst can group by (``dead_letter.category``);
the free-text reason beside it says the rest. Each category is set where its failure is raised."""

from __future__ import annotations

import enum


class Category(str, enum.Enum):
    NOT_FOUND = "not_found"  # no file at the uri
    PERMISSION_DENIED = "permission_denied"  # the file exists but may not be read
    TIMEOUT = "timeout"  # reading the file timed out
    HTTP_ERROR = "http_error"  # an HTTP(S) input answered with an error, or could not be reached
    NOT_A_REGULAR_FILE = "not_a_regular_file"  # a folder, a device, a pipe
    READ_ERROR = "read_error"  # any other failure to read the bytes (unknown protocol, ...)
    TOO_LARGE = "too_large"  # over decode.max_bytes, decode.max_pixels or video.max_frames
    NOT_AN_IMAGE = "not_an_image"  # empty, or a format no decoder identifies (for videos: not a video)
    DECODE_ERROR = "decode_error"  # an identified format whose data is corrupt or truncated
    MODEL_ERROR = "model_error"  # the model raised on the record alone, or returned NaN or inf
    BAD_MANIFEST_ROW = "bad_manifest_row"  # a manifest line or row that cannot be read as one (an empty uri, ...)
    BAD_LABEL = "bad_label"  # earlier runs only: a label that is no class index is now predictions.label_error
    DUPLICATE_ID = "duplicate_id"  # a later row of an id: another input listed earlier has it
