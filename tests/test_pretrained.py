"""Published weights in one call (a server on 127.0.0.1 stands in for torchvision's), and the
predict and export commands."""

import functools
import hashlib
import http.server
import json
import os
import sys
import threading

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import alexnet_jax as A  # noqa: E402
from alexnet_jax import export, predict, pretrained, torch_interop  # noqa: E402
from alexnet_jax.torch_reference import torch_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """A randomly initialised torchvision-format AlexNet, named by its hash as torchvision's is,
  and a bad file, served on 127.0.0.1."""
  root = tmp_path_factory.mktemp("served")
  torch.manual_seed(0)
  state_dict = torch_model("alexnet").state_dict()
  tmp = root / "weights.pth"
  torch.save(state_dict, tmp)
  prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
  good = f"alexnet-owt-{prefix}.pth"
  tmp.rename(root / good)
  (root / "alexnet-owt-0badf00d.pth").write_bytes(b"not the published file")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  handler.log_message = lambda *args: None
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield {"url": f"{base}/{good}", "bad_url": f"{base}/alexnet-owt-0badf00d.pth",
         "file": root / good, "params": torch_interop.params_from_torch(state_dict, "alexnet")}
  httpd.shutdown()


@pytest.fixture
def caches(tmp_path, monkeypatch):
  monkeypatch.setenv("ALEXNET_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  return tmp_path / "cache", tmp_path / "torch" / "hub" / "checkpoints"


def _assert_equal(a, b):
  assert set(a) == set(b)
  for layer in a:
    for k in a[layer]:
      np.testing.assert_array_equal(a[layer][k], b[layer][k], err_msg=f"{layer}/{k}")


DEAD = "http://127.0.0.1:9/alexnet-owt-{}.pth"  # the discard port: nothing listens


def test_load_downloads_once_checks_the_hash_and_later_needs_no_torch(server, caches, capsys,
                                                                      monkeypatch):
  cache, _ = caches
  _assert_equal(pretrained.load("alexnet", url=server["url"]), server["params"])
  err = capsys.readouterr().err
  assert "downloading alexnet-owt-" in err and "100% of 233 MiB" in err
  stem = server["file"].stem
  assert sorted(os.listdir(cache)) == [".lock", f"{stem}.msgpack"]  # the download is not kept
  # Again: no torch, no network.
  monkeypatch.setitem(sys.modules, "torch", None)
  prefix = stem.rsplit("-", 1)[1]
  _assert_equal(pretrained.load("torchvision", url=DEAD.format(prefix)), server["params"])
  # A feature extractor gets them without the head.
  features = pretrained.load("alexnet", A.create_model("alexnet", num_classes=0),
                             url=DEAD.format(prefix))
  assert "fc3" not in features


def test_the_hub_cache_is_used_and_a_wrong_hash_is_refused(server, caches):
  cache, hub = caches
  hub.mkdir(parents=True)
  (hub / server["file"].name).symlink_to(server["file"])
  prefix = server["file"].stem.rsplit("-", 1)[1]
  _assert_equal(pretrained.load("alexnet", url=DEAD.format(prefix)), server["params"])
  # torchvision's own name with other bytes: refused, and nothing converted.
  (hub / "alexnet-owt-7be5be79.pth").symlink_to(server["file"])
  with pytest.raises(ValueError, match=r"does not start with 7be5be79.*Delete it"):
    pretrained.load("alexnet")
  assert not (cache / "alexnet-owt-7be5be79.msgpack").exists()
  # A download whose hash is wrong is refused and deleted.
  with pytest.raises(ValueError, match="does not start with 0badf00d.*It was deleted"):
    pretrained.fetch("alexnet", url=server["bad_url"])
  assert not (cache / "alexnet-owt-0badf00d.pth").exists()


def test_without_torch_nothing_is_downloaded_that_could_not_be_converted(server, caches,
                                                                          monkeypatch, capsys):
  cache, _ = caches
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"needs PyTorch once: pip install 'alexnet-jax\[torch\]'"):
    pretrained.load("alexnet", url=server["url"])
  assert "downloading" not in capsys.readouterr().err
  assert not [f for f in os.listdir(cache) if f != ".lock"] if cache.exists() else True


def test_offline_is_one_clear_error(caches):
  _, hub = caches
  with pytest.raises(OSError) as e:
    pretrained.load("alexnet", url=DEAD.format("7be5be79"))
  assert f"cannot download {DEAD.format('7be5be79')}" in str(e.value)
  assert str(hub / "alexnet-owt-7be5be79.pth") in str(e.value)
  with pytest.raises(ValueError, match="no published weights called 'vgg'; known: alexnet, "
                                       "torchvision"):
    pretrained.load("vgg")


@pytest.fixture
def cached(server, caches):
  """The served weights, fetched into the cache under torchvision's own file name."""
  cache, _ = caches
  path = pretrained.fetch("alexnet", url=server["url"], progress=False)
  os.rename(path, cache / "alexnet-owt-7be5be79.msgpack")
  return server["params"]


def test_init_from_torchvision_and_predict_use_the_same_name(cached, tmp_path, capsys):
  from alexnet_jax import training
  from configs import imagenet_torchvision

  config = imagenet_torchvision.get_config()
  config.init_from = "torchvision"
  model = training.create_model_from_config(config, 1000)
  _assert_equal(training._initial_params(config, model), cached)
  config.model = "alexnet_half"
  with pytest.raises(ValueError, match="init_from='torchvision': those weights are for the "
                                       "alexnet variant, not alexnet_half"):
    training._initial_params(config, training.create_model_from_config(config, 1000))

  from test_data import _write_folder
  _write_folder(tmp_path / "photos", bad=True)
  photos = str(tmp_path / "photos" / "train")
  assert predict.main([photos, "--topk", "3", "--json", "--batch", "4"]) == 1
  captured = capsys.readouterr()
  results = json.loads(captured.out)
  broken = [r for r in results if "error" in r]
  assert [os.path.basename(r["file"]) for r in broken] == ["broken.jpg"]
  assert captured.err.count("error: ") == 1 and "broken.jpg: cannot read it" in captured.err
  assert "predict: 4/" in captured.err  # progress for a folder
  names = predict.class_names()
  assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
  good = [r for r in results if "top" in r]
  assert len(good) == len(results) - 1 and all(len(r["top"]) == 3 for r in good)
  # The probabilities are those of the model on torchvision's eval view of the image.
  first = good[0]
  preprocess = predict._preprocess(model)
  view = preprocess.eval(open(first["file"], "rb").read())
  x = preprocess.normalizer()({"image": view[None]})
  probs = np.asarray(jax.nn.softmax(model.apply({"params": cached}, x)))[0]
  best = np.argsort(-probs)[:3]
  assert [t["class"] for t in first["top"]] == list(best)
  np.testing.assert_allclose([t["probability"] for t in first["top"]], probs[best], rtol=1e-4)
  assert [t["name"] for t in first["top"]] == [names[k] for k in best]


def test_export_round_trips_with_a_symbolic_batch(tmp_path, capsys):
  model = A.create_model("alexnet_small")
  params = A.init_params(model, jax.random.key(0))
  weights = str(tmp_path / "small.msgpack")
  pretrained.save_params(weights, params)
  out = str(tmp_path / "small.jax")
  assert export.main(["--variant", "alexnet_small", "--weights", weights, "--out", out,
                      "--platforms", "cpu,cuda,tpu", "--batch", "dynamic"]) == 0
  assert "cpu, cuda, tpu" in capsys.readouterr().out
  exported = jax.export.deserialize(open(out, "rb").read())
  assert str(exported.in_avals[0].shape[0]) == "b"
  x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
  ref = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(exported.call(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  fixed = str(tmp_path / "fixed.jax")
  assert export.main(["--variant", "alexnet_small", "--weights", weights, "--out", fixed,
                      "--batch", "2"]) == 0
  assert jax.export.deserialize(open(fixed, "rb").read()).in_avals[0].shape == (2, 28, 28, 1)
  assert export.main(["--variant", "alexnet_small", "--weights", str(tmp_path / "none.msgpack"),
                      "--out", fixed]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_errors_use_the_callers_words(tmp_path):
  model = A.create_model("alexnet_small")
  other = tmp_path / "weights.bin"
  other.write_bytes(b"not weights")
  with pytest.raises(FileNotFoundError, match=r"--weights='.*weights.bin'.*not an Orbax "
                     r"checkpoint.*nor a weights file \(\.pth/\.pt/\.msgpack\)"):
    pretrained.load_weights(str(other), model, "alexnet_small", what="--weights")
  params = A.init_params(model.clone(num_classes=5), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="to start the head afresh, set replace_head=True$"):
    pretrained.match_model(params, model, "these params")
  with pytest.raises(ValueError, match="set --new_head$"):
    pretrained.match_model(params, model, "these params", replace_head_option="--new_head")
