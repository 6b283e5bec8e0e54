"""svp: on-device training with Stochastic Variational Propagation.

``svp.Model`` holds an svp model file: load and save it in f32, f16, bf16 or
int8, predict and evaluate on numpy arrays, fine-tune it with SVP or
backpropagation, and read or replace its weights as numpy arrays.

    >>> import svp
    >>> model = svp.Model.load("model.svpm")
    >>> report = model.finetune(x, y, epochs=2, method="svp")
    >>> model.evaluate(x_test, y_test)["accuracy"]
    >>> model.save("tuned.svpm", dtype="int8")
"""

from svp._native import Model, SvpError, __version__, dequantize, load_data, quantize

__all__ = ["Model", "SvpError", "__version__", "dequantize", "load_data", "quantize"]
