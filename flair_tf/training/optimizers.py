"""Keras's SGD and Adam with each variable's update as one fused TensorFlow kernel.

Keras 3 updates a variable with several element-wise ops: SGD without momentum
multiplies the gradient by the learning rate into a temporary and subtracts it
(two passes over the 24 M parameters of U-Net/ResNet34, one temporary); Adam
takes about ten. These subclasses compute the same formulas with TensorFlow's
training kernels (``ResourceApplyGradientDescent``, ``ResourceApplyKerasMomentum``,
``ResourceApplyAdam``): one pass per variable, no temporaries, XLA kernels for
TPU. They keep Keras's class names, variables and config, so checkpoints and
saved configs are interchangeable with Keras's optimizers.

Under a `tf.distribute` strategy Keras calls ``update_step`` inside
``strategy.extended.update`` with each replica's component of the variable, so
the handles used here are those of the replica being updated. Sparse gradients
(`tf.IndexedSlices`), AMSGrad and non-TensorFlow backends take Keras's own path.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _handle(variable):
    """The resource handle of a tf.Variable or of a Keras variable wrapping one."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def _fusable(gradient, variable) -> bool:
    return (keras.backend.backend() == "tensorflow"
            and not isinstance(gradient, tf.IndexedSlices)
            and isinstance(variable, tf.Variable))


@keras.saving.register_keras_serializable(package="flair_tf")
class SGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` (same arguments and math), one kernel per variable update."""

    def update_step(self, gradient, variable, learning_rate):
        if not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        lr = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=gradient)
            return None
        # accum = momentum * accum - lr * grad; var += accum (Nesterov: var += momentum * accum - lr * grad)
        accum = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=_handle(accum), lr=lr, grad=gradient,
            momentum=tf.cast(self.momentum, variable.dtype), use_nesterov=self.nesterov)
        return None


@keras.saving.register_keras_serializable(package="flair_tf")
class Adam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` (same arguments and math), one kernel per variable update.

    ``ResourceApplyAdam`` computes Keras's formula: ``alpha = lr * sqrt(1 - b2^t)
    / (1 - b1^t)``, ``m += (g - m) * (1 - b1)``, ``v += (g^2 - v) * (1 - b2)``,
    ``var -= m * alpha / (sqrt(v) + epsilon)``.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_nesterov=False)
        return None
