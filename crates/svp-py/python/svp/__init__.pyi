"""Type stubs of svp's native module (crates/svp-py/src)."""

from os import PathLike
from typing import List, Literal, Optional, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

__version__: str

Images = Union[npt.NDArray[np.uint8], npt.NDArray[np.float32]]
"""(n, h, w), (n, 1, h, w) or (n, h * w): uint8 pixels or float32 pixel / 255."""

Labels = npt.NDArray[np.integer]
"""(n,) class indices."""

DType = Literal["f32", "f16", "bf16", "int8"]

def load_data(
    path: Optional[Union[str, PathLike[str]]] = None,
) -> Tuple[Tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]], Tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]:
    """((x_train, y_train), (x_test, y_test)) from an IDX folder, or the embedded Fashion-MNIST subset."""

def quantize(
    x: npt.NDArray[np.float32], dtype: Literal["f16", "int8"]
) -> Tuple[Union[npt.NDArray[np.float16], npt.NDArray[np.int8]], Optional[npt.NDArray[np.float32]]]:
    """svp's quantizers: (float16 values, None) or (int8 values, one scale per row of the last axis)."""

def dequantize(
    q: Union[npt.NDArray[np.float16], npt.NDArray[np.int8]], scales: Optional[npt.NDArray[np.float32]] = None
) -> npt.NDArray[np.float32]:
    """The float32 values of what quantize() gave."""

class SvpError(Exception):
    """A model file that is damaged or does not fit, or a training run that failed."""

class Evaluation(TypedDict):
    accuracy: float
    loss: float
    samples: int

class EpochReport(TypedDict):
    epoch: int
    train_loss: float
    test_acc: Optional[float]
    val_acc: Optional[float]
    seconds: float
    samples_per_s: float

class FinetuneReport(TypedDict):
    epochs: List[EpochReport]
    kept_epoch: int
    method: Literal["svp", "bp"]
    param_bytes: int
    optimizer_bytes: int
    workspace_bytes: int

class Model:
    """A trained network as an svp model file holds it."""

    @staticmethod
    def load(path: Union[str, PathLike[str]]) -> Model:
        """Reads and checks a model file (OSError, SvpError)."""
    @staticmethod
    def from_bytes(data: bytes) -> Model:
        """A model from the bytes of a model file (SvpError)."""
    def save(self, path: Union[str, PathLike[str]], dtype: Optional[DType] = None) -> None:
        """Writes the model atomically, as `dtype` (default: its own)."""
    def to_bytes(self, dtype: Optional[DType] = None) -> bytes:
        """The bytes of the model file, as `dtype` (default: its own)."""
    @property
    def classes(self) -> int: ...
    @property
    def image_shape(self) -> Tuple[int, int]: ...
    @property
    def class_names(self) -> List[str]: ...
    @property
    def dtype(self) -> DType: ...
    @property
    def method(self) -> str:
        """The rule that trained it last: "svp" or "bp"."""
    @property
    def layers(self) -> int:
        """Trainable layers, the head included (what train_from_layer counts)."""
    @property
    def has_projection_heads(self) -> bool: ...
    @property
    def input_norm(self) -> Tuple[float, float]:
        """(mean, std) of pixel / 255 used to standardize inputs."""
    @property
    def nbytes(self) -> int:
        """Bytes of the model file."""
    def logits(self, x: Images, exit: Optional[int] = None) -> npt.NDArray[np.float32]:
        """(n, classes) logits; exit=k reads hidden layer k's projection head."""
    def predict(self, x: Images, exit: Optional[int] = None) -> npt.NDArray[np.int64]:
        """(n,) predicted classes."""
    def evaluate(self, x: Images, y: Labels) -> Evaluation:
        """Accuracy and mean cross-entropy."""
    def finetune(
        self,
        x: npt.NDArray[np.uint8],
        y: Labels,
        *,
        epochs: int = 1,
        method: Optional[Literal["svp", "bp"]] = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_from_layer: int = 1,
        augment_shift: int = 0,
        augment_flip: bool = False,
        val_split: Optional[float] = None,
        keep: Literal["best", "last"] = "last",
        x_test: Optional[npt.NDArray[np.uint8]] = None,
        y_test: Optional[Labels] = None,
    ) -> FinetuneReport:
        """Continues training in place, as `svp finetune` does."""
    def get_weights(self) -> List[npt.NDArray[np.float32]]:
        """One float32 array per tensor of the model file, in its order."""
    def weight_names(self) -> List[str]:
        """`layer{k}.{role}` for each array of get_weights()."""
    def set_weights(self, weights: List[npt.NDArray[np.float32]]) -> None:
        """Replaces every weight (same order and shapes as get_weights())."""
