from torchdiff.cli import entry

entry()
