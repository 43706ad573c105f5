import subprocess
import sys

import jax
import numpy as np
import pytest

import alexnet_jax as A
from alexnet_jax import ops


def test_import_is_jax_only():
  code = ("import sys, alexnet_jax; bad = [m for m in sys.modules if m.split('.')[0] in "
          "('torch', 'tensorflow')]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_torchvision_parameter_count():
  assert A.count_params(A.init_params(A.create_model("alexnet"), jax.random.key(0))) == 61_100_840


def test_bad_input_errors():
  m = A.create_model("alexnet")
  p = A.init_params(m, jax.random.key(0))
  # One image is refused, with the fix: (N, H, W) grey batches would look the same.
  with pytest.raises(ValueError, match=r"rank 4 .* of rank 3\. For one image, add the batch "
                                       r"axis: x\[None\]"):
    m.apply({"params": p}, np.zeros((224, 224, 3), np.float32))
  with pytest.raises(ValueError, match=r"of rank 2\.(?!.*x\[None\])"):
    m.apply({"params": p}, np.zeros((224, 224), np.float32))
  with pytest.raises(ValueError, match="3 input channels"):
    m.apply({"params": p}, np.zeros((1, 3, 224, 224), np.float32))
  with pytest.raises(ValueError, match="at least 63x63"):
    m.apply({"params": p}, np.zeros((1, 62, 62, 3), np.float32))
  m.apply({"params": p}, np.zeros((1, 63, 63, 3), np.float32))
  with pytest.raises(ValueError, match="exactly 224x224"):
    A.create_model("alexnet_half").check_input_shape((1, 256, 256, 3))
  with pytest.raises(ValueError, match="unknown variant"):
    A.create_model("vgg")


def test_a_narrower_classifier_by_overrides():
  m = A.create_model("alexnet", avgpool_size=4, hidden_width=2048)
  p = A.init_params(m, jax.random.key(0))
  assert p["fc1"]["kernel"].shape == (256 * 4 * 4, 2048)


@pytest.mark.parametrize("init", A.INITS)
def test_init_statistics(init):
  m = A.create_model("alexnet_paper", weight_init=init)
  p = A.init_params(m, jax.random.key(1))
  w = np.asarray(p["fc2"]["kernel"])
  if init == "torch":
    bound = 1 / np.sqrt(4096)
    assert np.abs(w).max() <= bound and np.isclose(w.std(), bound / np.sqrt(3), rtol=0.02)
  elif init == "paper":
    assert np.isclose(w.std(), 0.01, rtol=0.02)
    assert np.all(np.asarray(p["conv2"]["bias"]) == 1) and np.all(np.asarray(p["conv1"]["bias"]) == 0)
  else:
    k = np.asarray(p["conv3"]["kernel"])
    assert np.isclose(k.std(), np.sqrt(2 / (384 * 9)), rtol=0.05)


def test_winograd_and_direct_convolutions_agree_with_gradients(monkeypatch):
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)  # a batch of 2 small images
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 28, 28, 1), np.float32)
  fast = A.create_model("alexnet_small")
  direct = A.create_model("alexnet_small", impl=ops.Implementation(winograd=False))
  params = A.init_params(direct, jax.random.key(0))
  outs = [jax.value_and_grad(lambda p, m=m: (m.apply({"params": p}, x) ** 2).sum())(params)
          for m in (fast, direct)]
  (loss, grads), (ref_loss, ref_grads) = outs
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name in ref_grads:
    scale = float(np.abs(ref_grads[name]["kernel"]).max())
    np.testing.assert_allclose(grads[name]["kernel"], ref_grads[name]["kernel"], rtol=0,
                               atol=1e-4 * scale, err_msg=name)
  hlo = lambda m: jax.jit(lambda p: m.apply({"params": p}, x)).lower(params).compile().as_text()
  if jax.default_backend() == "cpu":  # conv1 has one input channel: too thin for Winograd
    assert (hlo(fast).count("convolution("), hlo(direct).count("convolution(")) == (1, 5)


def test_cpu_eval_forward_runs_the_conv_stack_by_chunks(monkeypatch):
  # 6 images x 16 conv2 tiles reach it, so conv2 alone runs by Winograd, also in chunks of 3.
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 96)
  x = np.random.default_rng(0).standard_normal((6, 28, 28, 1), np.float32)
  chunked = A.create_model("alexnet_small", impl=ops.Implementation(eval_chunk=4))
  whole = A.create_model("alexnet_small", impl=ops.Implementation(eval_chunk=0))
  params = A.init_params(whole, jax.random.key(0))
  fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, x))
  ref = np.asarray(fwd(whole)(params))
  np.testing.assert_allclose(fwd(chunked)(params), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
  # Capturing intermediates runs the whole batch (values sown in a loop would leak its tracers).
  _, state = jax.jit(lambda p: chunked.apply({"params": p}, x, capture_intermediates=True,
                                             mutable=["intermediates"]))(params)
  assert state["intermediates"]["conv1"]["__call__"][0].shape == (6, 24, 24, 96)
  if jax.default_backend() == "cpu":
    hlo = lambda f: f.lower(params).compile().as_text()
    assert "while" in hlo(fwd(chunked)) and "while" not in hlo(fwd(whole))
    # conv1 (one channel) and conv3-conv5 (24 tiles) direct, chunks or not
    assert hlo(fwd(chunked)).count("convolution(") == hlo(fwd(whole)).count("convolution(") == 4
    # Training runs the whole batch: no loop beyond those of the dropout RNG.
    train = lambda m: jax.jit(jax.grad(lambda p: m.apply(
        {"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}).sum()))
    assert hlo(train(chunked)).count(" while(") == hlo(train(whole)).count(" while(")
    # So does a derivative of the eval forward (the chunk loop's was several times slower), and
    # it equals the whole batch's.
    grad = lambda m: jax.jit(jax.grad(lambda p: (m.apply({"params": p}, x) ** 2).sum()))
    assert " while(" not in hlo(grad(chunked))
    for a, b in zip(jax.tree_util.tree_leaves(grad(chunked)(params)),
                    jax.tree_util.tree_leaves(grad(whole)(params))):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_the_default_eval_chunk_keeps_conv1_output_near_the_budget():
  alexnet, small = A.create_model("alexnet"), A.create_model("alexnet_small")
  chunk = lambda impl, model, shape: model.clone(impl=impl).eval_chunk(shape)
  # torchvision's AlexNet: conv1's output is 55x55x64 fp32, 774 KB an image
  assert chunk(ops.FAST, alexnet, (64, 224, 224, 3)) == 4
  assert chunk(ops.FAST, alexnet, (63, 224, 224, 3)) == 3  # divides the batch
  assert chunk(ops.FAST, alexnet, (2, 224, 224, 3)) == 2
  assert chunk(ops.XLA, alexnet, (64, 224, 224, 3)) == 64
  assert chunk(ops.Implementation(eval_chunk=8), alexnet, (64, 224, 224, 3)) == 8
  assert chunk(ops.FAST, small, (256, 28, 28, 1)) == 16  # 221 KB an image
  assert chunk(ops.FAST, alexnet, (8, 1024, 1024, 3)) == 1  # 16 MB an image


def test_the_implementation_is_no_setting_and_is_checked():
  # Speed only: configs, variants and checkpoints never hold it.
  assert "impl" not in A.SETTINGS and A.create_model("alexnet").impl == ops.FAST
  with pytest.raises(ValueError, match="eval_chunk=-1 must be None or an int >= 0"):
    ops.Implementation(eval_chunk=-1)
  with pytest.raises(ValueError, match="unknown setting"):
    A.create_model("alexnet", cpu_winograd=False)
  with pytest.raises(ValueError, match="impl must be an ops.Implementation"):
    A.create_model("alexnet", impl="xla")


NARROW = dict(conv_features=(8, 16, 16, 16, 8), hidden_width=32)


def test_features_by_num_classes_0_flat_features_and_named_activations(tmp_path):
  from alexnet_jax import pretrained

  full = A.create_model("alexnet", **NARROW)
  features = A.create_model("alexnet", num_classes=0, **NARROW)
  params = A.init_params(full, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 67, 67, 3))
  logits, state = full.apply({"params": params}, x, mutable=["intermediates"])
  acts = state["intermediates"]["activations"]
  shapes = {k: v.shape for k, v in acts.items()}
  assert shapes == {"conv1": (2, 16, 16, 8), "pool1": (2, 7, 7, 8), "conv2": (2, 7, 7, 16),
                    "pool2": (2, 3, 3, 16), "conv3": (2, 3, 3, 16), "conv4": (2, 3, 3, 16),
                    "conv5": (2, 3, 3, 8), "pool3": (2, 1, 1, 8), "fc1": (2, 32), "fc2": (2, 32)}
  assert all(float(v.min()) >= 0 for v in acts.values())  # after the ReLUs
  # fc3 of the penultimate features is the logits.
  without_head = {k: v for k, v in params.items() if k != "fc3"}
  penultimate = features.apply({"params": without_head}, x)
  np.testing.assert_allclose(penultimate, acts["fc2"], rtol=1e-6)
  np.testing.assert_allclose(penultimate @ params["fc3"]["kernel"] + params["fc3"]["bias"],
                             logits, rtol=1e-5, atol=1e-6)
  assert set(A.init_params(features, jax.random.key(0))) == set(without_head)
  assert set(full.init(jax.random.key(0), x)) == {"params"}  # init keeps no activations
  flat = full.apply({"params": params}, x, method="flat_features")
  assert flat.shape == (2, 8 * 6 * 6)
  np.testing.assert_allclose(flat.reshape(2, 6, 6, 8)[:, 0, 0], acts["pool3"][:, 0, 0])
  # A feature extractor loads a full file, its head dropped (PyTorch's: test_torch_interop).
  msgpack = str(tmp_path / "full.msgpack")
  pretrained.save_params(msgpack, params)
  loaded = pretrained.load_weights(msgpack, features, "alexnet")
  assert set(loaded) == set(without_head)
  np.testing.assert_array_equal(loaded["fc1"]["kernel"], params["fc1"]["kernel"])
