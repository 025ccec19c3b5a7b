"""Three small ImageNet-pretrained MobileNets for fusion-engine, as package data.

fusion-engine finds this folder through the ``fusion_engine.weights`` entry point and reads its
``index.json`` (name -> file, architecture, preprocessing, sha256, source, licence) without importing
this module. ``FOLDER`` is the folder itself, for those who want the files directly.
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
INDEX = FOLDER / "index.json"
