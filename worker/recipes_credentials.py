"""The credentials file a recipes file may name (``credentials: FILE`` at its top).

Factor's ``credentials.yml``: ``hipchat: {api_key: ...}`` is the key "default";
``hipchat: {NAME: {api_key: ...}}`` names several. Other top-level keys are other tools'.
Its errors are reported as ``FILE:LINE: reason`` of the credentials file, followed by the line
of the recipes file that names it; no message quotes a key's value.
"""

from __future__ import annotations

from pathlib import Path

from yaml.nodes import Node

from worker.yaml_reader import YamlReader

DEFAULT_CREDENTIALS_KEY = "default"  # Factor's single form {hipchat: {api_key: ...}}


class Credentials:
    """The api_keys of one credentials file, by key; ``tokens`` is None if it was unusable."""

    def __init__(self, path: str, tokens: dict[str, str] | None) -> None:
        self.path = path
        self.tokens = tokens  # None: unreadable, already reported

    @classmethod
    def load(cls, reader: YamlReader, node: Node) -> Credentials:
        """Read the file that ``node`` of the recipes file names (relative to that file)."""
        name = reader.text(node, "credentials")
        if name is None:
            return cls("", None)
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = Path(reader.path).parent / path
        own = YamlReader(str(path), reader.key_hints)
        root = own.compose()
        if root is None and not own.errors:
            own.error(1, "the credentials file is empty")
        tokens = None if root is None else cls._tokens(own, root)
        if own.errors:
            # Where the credentials file is wrong, then where the recipes file names it.
            reader.errors.extend(own.errors)
            reader.error(node, f"the credentials file {path} could not be used")
            return cls(str(path), None)
        return cls(str(path), tokens)

    @staticmethod
    def _tokens(reader: YamlReader, root: Node) -> dict[str, str]:
        top = reader.mapping(root, "the credentials file")
        if top is None:
            return {}
        if "hipchat" not in top:
            reader.error(root, "the credentials file has no hipchat section")
            return {}
        entries = reader.mapping(top["hipchat"][1], "hipchat") or {}
        tokens: dict[str, str] = {}
        for key, (_, value_node) in entries.items():
            if key == "api_key":
                token = reader.text(value_node, "hipchat: api_key")
                key = DEFAULT_CREDENTIALS_KEY
            else:
                fields = reader.mapping(value_node, f"hipchat: {key}", ("api_key",))
                if fields is None:
                    continue
                if "api_key" not in fields:
                    reader.error(value_node, f"hipchat: {key}: api_key is required")
                    continue
                token = reader.text(fields["api_key"][1], f"hipchat: {key}: api_key")
            if token is not None:
                tokens[key] = token.strip()
        return tokens

    def get(self, reader: YamlReader, node: Node, key: str, what: str) -> str | None:
        """The api_key under ``key``; None after recording why at ``node`` of the recipes file."""
        if self.tokens is None:
            return None  # unreadable: reported once, where the file is named
        if key not in self.tokens:
            known = ", ".join(sorted(self.tokens)) or "none"
            reader.error(
                node, f"{what}: no key {key!r} under hipchat in {self.path} (keys there: {known})"
            )
            return None
        if not self.tokens[key]:
            reader.error(node, f"{what}: the api_key of {key!r} in {self.path} is empty")
            return None
        return self.tokens[key]
