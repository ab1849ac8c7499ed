"""The code that ships inside a model folder reaches transformers and pyctcdecode through their public API only,
so a release that renames an internal does not break a saved model; and the public re-computations that replace
the internals agree with them."""

import ast
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

import modeling_tot_cakt
from modeling_tot_cakt.configuration_tot_cakt import SUPPORTED_ENCODERS
from modeling_tot_cakt.modeling_tot_cakt import encoder_output_lengths

PACKAGE = Path(modeling_tot_cakt.__file__).parent
# The files a saved model carries for `trust_remote_code` (the processors' and the feature extractors' too).
SHIPPED_FILES = sorted(
    path
    for pattern in ("configuration_*.py", "modeling_*.py", "tot.py", "processing_*.py", "feature_extraction_*.py")
    for path in PACKAGE.glob(pattern)
)

# Underscored names that upstream documents as hooks a subclass overrides or sets; each with the reason.
ALLOWED_UPSTREAM_HOOKS = {
    "_supports_sdpa": "PreTrainedModel's class flag that a model sets to declare SDPA attention support",
    "_forward": "the Pipeline method a custom pipeline implements (transformers' 'Adding a new pipeline' guide)",
}


def own_private_names(trees) -> set[str]:
    """Underscored names the shipped files define themselves: functions, classes, and attributes they assign."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if is_private(name)}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_accesses(source: str, own: set[str]) -> list[str]:
    """`line: name` for each underscored name the source reads or imports that it does not define itself."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            modules = (node.module or "").split(".")
            for part in modules:
                if is_private(part):
                    found.append(f"{node.lineno}: module {node.module}")
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(is_private(part) for part in alias.name.split(".")):
                    found.append(f"{node.lineno}: import {alias.name}")
    return [access for access in found if access.split(".")[-1].split(" ")[-1] not in ALLOWED_UPSTREAM_HOOKS]


def test_the_shipped_files_are_the_remote_code_files():
    names = {path.name for path in SHIPPED_FILES}
    assert {"modeling_tot_cakt.py", "tot.py", "processing_tot_cakt_lm.py", "feature_extraction_tot_cakt.py"} <= names


def test_shipped_code_reaches_no_private_name_of_another_library():
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in SHIPPED_FILES]
    own = own_private_names(trees)
    found = {
        path.name: accesses
        for path in SHIPPED_FILES
        if (accesses := private_accesses(path.read_text(encoding="utf-8"), own))
    }
    assert found == {}, f"private upstream names in shipped files (use public API, or allow-list a hook): {found}"


@pytest.mark.parametrize(
    "planted",
    [
        "x = processor._get_arguments_from_pretrained('folder')",
        "labels = decoder._alphabet.labels",
        "from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices",
        "import transformers.utils._private",
        "n = self.encoder._get_feat_extract_output_lengths(lengths)",
    ],
)
def test_the_check_sees_a_planted_private_access(planted):
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in SHIPPED_FILES]
    assert private_accesses(planted, own_private_names(trees)), planted


def test_own_underscored_names_and_allowed_hooks_pass():
    own = own_private_names([ast.parse("class A:\n    def _helper(self):\n        self._state = 1\n")])
    assert private_accesses("a._helper(); a._state; b._forward(x); C._supports_sdpa", own) == []


CONVOLUTIONS = {"conv_dim": (8, 8, 8), "conv_stride": (5, 3, 2), "conv_kernel": (10, 3, 3)}
# Each supported encoder family, tiny, with its options that change the output length.
FAMILY_OPTIONS = {
    "wav2vec2": [{}, {"add_adapter": True, "num_adapter_layers": 2, "adapter_stride": 2}],
    "wav2vec2-bert": [
        {},
        {"add_adapter": True, "num_adapter_layers": 2, "adapter_stride": 2, "adapter_kernel_size": 3},
    ],
    "wavlm": [{}, {"add_adapter": True, "num_adapter_layers": 1, "adapter_stride": 3}],
    "data2vec-audio": [{}, {"add_adapter": True, "num_adapter_layers": 1, "adapter_stride": 2}],
}


@pytest.mark.parametrize(
    "model_type,options",
    [(family, options) for family in SUPPORTED_ENCODERS for options in FAMILY_OPTIONS.get(family, [{}])],
)
def test_encoder_output_lengths_equal_the_encoders_own_count(model_type, options):
    convolutions = {} if model_type == "wav2vec2-bert" else CONVOLUTIONS
    config = AutoConfig.for_model(
        model_type, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        **convolutions, **options,
    )  # fmt: skip
    encoder = AutoModel.from_config(config)
    lengths = torch.tensor([1, 9, 10, 31, 32, 400, 4001, 16000])
    # The encoders' own count is a private method: a test may call it, the shipped code does not.
    expected = encoder._get_feat_extract_output_lengths(lengths)
    assert torch.equal(encoder_output_lengths(config, lengths), expected)
