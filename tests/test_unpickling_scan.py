"""The unpickling scan itself: every offending pattern is caught, safe code passes."""

import pytest

from tests.unpickling_scan import scan_source

OFFENDERS = {
    "pickle": "import pickle",
    "cPickle": "import cPickle",
    "_pickle": "from _pickle import loads",
    "pickle under another name": "import pickle as serializer\nserializer.loads(b'')",
    "pickle function alias": "from pickle import loads as decode\ndecode(b'')",
    "cloudpickle": "import cloudpickle",
    "cloudpickle from ray": "from ray import cloudpickle",
    "cloudpickle as an attribute": "import ray\nray.cloudpickle.loads(b'')",
    "dill": "import dill",
    "joblib": "from joblib import load",
    "shelve": "import shelve",
    "marshal": "import marshal",
    "pandas.read_pickle": "import pandas as pd\ndf = pd.read_pickle('f')",
    "read_pickle imported": "from pandas import read_pickle",
    "to_pickle": "frame.to_pickle('f')",
    "numpy allow_pickle": "import numpy as np\nnp.load('f', allow_pickle=True)",
    "allow_pickle over lines": "import numpy\nnumpy.load(\n    'f',\n    allow_pickle=True,\n)",
    "allow_pickle from a variable": "np.load('f', allow_pickle=trusted)",
    "from torch import load": "from torch import load\nload('f')",
    "torch load under an alias": "from torch import load as L\nL('f')",
    "torch.load over lines": "import torch\ntorch.load(\n    'f',\n    map_location='cpu',\n)",
    "torch aliased module": "import torch as t\nt.load('f', weights_only=False)",
    "weights_only not a constant": "import torch\ntorch.load('f', weights_only=flag)",
    "weights_only hidden in kwargs": "import torch\ntorch.load('f', **options)",
    "torch.load passed around": "import torch\nread = torch.load\nread('f')",
    "torch.serialization.load": "import torch\ntorch.serialization.load('f')",
    "hub loader": "import torch\ntorch.hub.load_state_dict_from_url('u')",
    "import_module": "import importlib\nimportlib.import_module('pickle')",
    "__import__": "__import__('dill')",
    "in a function": "def f(path):\n    import pickle\n    return pickle.load(open(path, 'rb'))",
}

SAFE = {
    "weights_only=True": "import torch\ntorch.load(\n    'f',\n    weights_only=True,\n)",
    "aliased, weights_only=True": "from torch import load as L\nL('f', weights_only=True)",
    "numpy.load default": "import numpy as np\nnp.load('f')",
    "numpy allow_pickle False": "import numpy as np\nnp.load('f', allow_pickle=False)",
    "safetensors": "from safetensors.torch import load_file\nload_file('f')",
    "json and yaml": "import json, yaml\njson.loads('{}')\nyaml.safe_load('')",
    "words in comments and strings": "# import pickle; torch.load(f)\ntext = 'pickle marshal dill'",
    "a local load": "def load(path):\n    return path\nload('f')",
    "pickle-like names": "pickled_size = 3\nmarshalled = unpickle_free = 1",
}


@pytest.mark.parametrize("source", OFFENDERS.values(), ids=OFFENDERS.keys())
def test_each_offending_pattern_is_caught(source: str) -> None:
    assert scan_source(source) != []


@pytest.mark.parametrize("source", SAFE.values(), ids=SAFE.keys())
def test_safe_code_passes(source: str) -> None:
    assert scan_source(source) == []


def test_a_finding_names_the_file_and_the_line() -> None:
    source = "import json\n\nfrom torch import load as L\nx = L(\n    'f',\n)\n"
    assert scan_source(source, "pkg/m.py") == [
        "pkg/m.py:4: calls torch.load without weights_only=True"
    ]
