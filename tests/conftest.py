"""Test-session settings that must exist before any test module imports transformers."""

import os
import tempfile

# transformers copies remote code (trust_remote_code=True) under HF_MODULES_CACHE and puts that folder on sys.path
# once per process: one temporary folder for the whole session keeps it out of the user's cache and lets every test
# that loads an exported checkpoint find its copy.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="mf_test_hf_modules_"))
