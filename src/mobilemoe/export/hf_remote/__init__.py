"""The transformers wrappers of every Hugging Face export (``trust_remote_code``); not imported here.

They import, relatively, the copies of ``model.py``, ``moe.py``, ... that ``mobilemoe export hf``
writes beside them (:func:`mobilemoe.export.hf.remote_code`).
"""
