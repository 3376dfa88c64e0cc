"""Reading one sample: the image FitNormalize captures in the dataset's pipeline, and errors named by sample.

Errors raised in DataLoader workers travel back as data (:class:`_Failure`), so the user gets the original
exception type and a ``Sample 7: ...`` message instead of DataLoader's wrapper.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from torch import Tensor
from torch.utils.data import Dataset

from ._warn import warn
from .images import check_image, find_image

__all__ = ["Capture", "read_image", "read_images"]


class Capture:
    """Where the FitNormalize being fitted hands over the image it sees in a sample.

    During a fit, the FitNormalize inside the dataset's own pipeline offers each
    image here instead of normalizing it, and the sample stops right there
    (:class:`_Captured` unwinds the dataset's ``__getitem__``): the transforms
    after it cost nothing and cannot change what is measured, and a dataset
    that memoizes its samples never keeps a pass-through one. The stop is
    raised once per sample, so a dataset that swallows it (a bare ``except:``
    that retries) cannot loop.

    A stream's sample cannot be stopped (the exception would end its
    generator): with ``stop=False`` the image is copied, in case a later
    transform works in place, and passed on unchanged.
    """

    def __init__(self, stop: bool = True) -> None:
        self.stop = stop
        self.image: Tensor | None = None
        self.stopped = False
        self.took = False

    def offer(self, image: Tensor) -> Tensor:
        if self.image is None:
            self.image = image if self.stop else image.clone()
        if self.stop and not self.stopped:
            self.stopped = True
            raise _Captured
        return image

    def take(self) -> Tensor | None:
        """The image offered since the last take (None if none); ``took`` says whether there was one."""
        image, self.image, self.stopped = self.image, None, False
        self.took = image is not None
        return image


class _Captured(BaseException):
    """Stops reading a sample once the FitNormalize being fitted has its image (not an ``Exception``, so a
    dataset that catches ``Exception`` to skip bad files lets it through)."""


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a DataLoader worker (as in ``concurrent.futures``)."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class _Failure:
    """An error raised while reading or reducing samples, sent back as data.

    Raising it in the main process gives the user the original exception type and
    message (``Sample 7: ...``) instead of DataLoader's worker wrapper, with the
    worker's traceback attached as the cause.
    """

    error: Exception
    traceback: str

    @classmethod
    def capture(cls, error: Exception) -> _Failure:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.dumps(error)
        except Exception:  # it must cross the worker queue
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error, text)

    def reraise(self) -> NoReturn:
        raise self.error from _RemoteTraceback(f'\n"""\n{self.traceback}"""')




def read_image(
    read: Callable[[], Any], where: str, capture: Capture | None, image: Callable[[Any], Any] | None
) -> Tensor:
    """Read one sample with ``read()`` and return its image tensor, checked.

    The image a FitNormalize in the pipeline captured, else the one found in
    the sample (``image(sample)`` or :func:`find_image`). Every error names
    the sample with ``where`` (``"Sample 7: "``). The map-style and the
    stream readers both read through here; a stream's ``StopIteration``
    passes through unchanged.
    """
    if capture is not None:
        capture.take()
    try:
        sample = read()
    except _Captured:  # FitNormalize has the image: the rest of the sample is not built
        return check_image(capture.take(), where)
    except StopIteration:
        raise
    except Exception as error:
        named = _naming_sample(error, where)
        if named is error:
            raise
        raise named from error
    captured = capture.take() if capture is not None else None
    if captured is not None:
        if capture.stop:
            _warn_swallowed_stop()
        return check_image(captured, where)
    found = image(sample) if image is not None else find_image(sample)
    if found is None:
        raise TypeError(
            f"{where}found no image tensor in a sample of type {type(sample).__name__}. "
            "Return a tensor, a tv_tensors.Image or a tuple/dict holding one, or pass image=... to fit()."
        )
    return check_image(found, where)


def _warn_swallowed_stop() -> None:
    warn(
        "The dataset's __getitem__ caught the signal FitNormalize raises to stop a sample once it has its image "
        "(a bare 'except:' or 'except BaseException:'). The statistics are right, but a dataset that memoizes "
        "samples may now hold un-normalized ones from this fit: catch Exception instead, or clear its memo.",
        UserWarning)


def _naming_sample(error: Exception, where: str) -> Exception:
    """The same kind of error, its message starting with the sample index.

    An exception class that cannot be built from one message is kept whole
    (its own attributes may matter to the caller), with the index in a note.
    """
    try:
        return type(error)(f"{where}reading the dataset failed: {error}")
    except Exception:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"{where}reading the dataset failed")
        return error


def read_images(
    dataset: Dataset, indices: Sequence[int], capture: Capture | None = None, image: Callable[[Any], Any] | None = None
) -> list[Tensor]:
    """The images of ``dataset[i]`` for ``i`` in ``indices``, read here, one by one (to verify a cache hit)."""
    return [read_image(lambda: dataset[index], f"Sample {index}: ", capture, image) for index in indices]
