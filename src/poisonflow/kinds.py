"""Kinds from their schema fragments: the registries and the assembled config schema.

A kind is a module plus a YAML fragment beside it (``attacks/badnets.py`` + ``attacks/badnets.yaml``).
The fragment is the one place of the kind's keys, types, ranges, defaults and descriptions::

    kind: badnets               # the config name (``kind:``, or ``source:`` for datasets)
    role: backdoor              # backdoor | unlearnable | defense | source
    summary: one line for the docs and the schema
    properties: {...}           # JSON Schema of the kind's own keys (the role's common keys are added)
    required: [...]             # optional, likewise allOf
    include: [downloadKeys]     # optional: further key groups of the base schema's $defs
    capabilities: [poison]      # optional, declared behaviour the stages read (see CAPABILITIES)
    checks: {...}               # optional: declared checks (patch: fits the images; reserve: needs
                                #   clean data; linf / changed_pixels: bounds the contract test asserts)
    tiny: {...}                 # optional: overrides for a seconds-long run on a tiny input (tests)
    split: [key, ...]           # optional (defenses): the kind splits the training set with ``split(spec,
                                #   ctx)``; its split, which depends on these keys only, is a cached job
    generator:                  # optional (backdoors): the kind's trigger is trained once per
      summary: ...              #   dataset by the trigger stage, from a ``generators:`` entry of
      properties: {...}         #   this kind with these keys (``seed`` is added); attack entries
      required: [...]           #   name it with ``generator:``

The registries are found by reading the fragments of the kind folders (:data:`FOLDERS`); no kind
module, and so neither numpy nor torch, is imported: the workflow is parsed on every run. The base
schema (``config.schema.yaml`` in this package) leaves the ``allOf`` of the ``dataset``, ``attack``
and ``defense`` definitions empty; :func:`config_schema` fills them with one ``if kind: … then:``
block per fragment. A kind module reads its settings with :func:`settings_for`, which fills the
fragment's defaults and checks the ranges with the same schema the config is validated against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError
from .registry import Registry as BaseRegistry

PACKAGE_DIR = Path(__file__).resolve().parent
BASE_SCHEMA = PACKAGE_DIR / "config.schema.yaml"
FOLDERS = ("attacks", "unlearnable", "defenses", "data")

# Behaviour a backdoor kind can declare in its fragment's ``capabilities:``.
CAPABILITIES = {
    "poison": "its trigger makes the poisoned training samples itself (trigger.poison(x, y)), e.g. a "
              "label-consistent perturbation before the trigger; otherwise trigger.apply(x) is used",
    "noise": "its trigger has a noise mode (trigger.noise(x, generator), trigger.noise_ratio): extra "
             "samples modified without the trigger that keep their label (WaNet)",
    "cover": "a backdoor with cover samples: the stage draws cover_rate of the training set from the samples "
             "not poisoned, applies the training trigger (poison() or apply()) and keeps their labels "
             "(train/cover in the store)",
    "labelled-test": "its trigger edits each image of the ASR set for its true class: the stage calls "
                     "trigger.apply_labelled(x, true_labels) instead of trigger.apply(x) (VSSC's prompts name the class)",
    "report": "its trigger reports on its generation (trigger.report() → a dict, e.g. acceptance rates), stored in "
              "the poisoned store's attribute trigger_report",
    "per-sample": "an unlearnable-example kind whose module has prepare(spec, context, seed) returning a "
                  "function that protects any chunk of images independently (poisonflow protect)",
}


@dataclass(frozen=True)
class Role:
    """How the kinds of one role enter the config: section, schema definition, common keys."""
    name: str
    what: str  # in messages: "unknown <what> 'x'"
    section: str  # config section of the entries
    definition: str  # the base schema's $defs entry whose allOf receives the kind blocks
    discriminator: str  # the key naming the kind in an entry
    common: str  # $defs entry with the keys every kind of the role takes
    heading: str  # in the generated docs


ROLES = {
    "backdoor": Role("backdoor", "attack kind", "attacks", "attack", "kind", "backdoorKeys", "Backdoor attacks"),
    "unlearnable": Role("unlearnable", "unlearnable-example kind", "attacks", "attack", "kind", "unlearnableKeys",
                        "Unlearnable examples"),
    "defense": Role("defense", "defense kind", "defenses", "defense", "kind", "defenseKeys", "Defenses"),
    "source": Role("source", "dataset source", "datasets", "dataset", "source", "datasetKeys", "Dataset sources"),
}
# Keys the config adds to an entry when it resolves it (the named surrogate's own entry).
RESOLVED_KEYS = ("surrogate_entry", "generator_entry")
FRAGMENT_KEYS = {"kind", "role", "summary", "properties", "required", "allOf", "include", "capabilities", "checks",
                 "tiny", "generator", "split"}


@dataclass(frozen=True)
class Fragment:
    kind: str
    role: Role
    module: str  # dotted name of the implementing module
    path: Path
    summary: str
    properties: dict = field(default_factory=dict)
    required: tuple = ()
    all_of: tuple = ()
    include: tuple = ()
    capabilities: frozenset = frozenset()
    checks: dict = field(default_factory=dict)
    tiny: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)  # the generators-entry fragment, if the kind trains one
    # a defense that splits the training set: the entry keys its split depends on (the split is then
    # its own cached job, results/splits/…, that the defense and any `split-train` entry read)
    split: tuple = ()

    def generator_block(self, definitions: dict) -> dict:
        """The JSON Schema of a ``generators:`` entry of this kind."""
        properties = {"kind": True, **copy.deepcopy(definitions["generatorKeys"]["properties"]),
                      **copy.deepcopy(self.generator.get("properties", {}))}
        block = {"description": " ".join(str(self.generator.get("summary", self.summary)).split()), "type": "object",
                 "additionalProperties": False, "properties": properties}
        if self.generator.get("required"):
            block["required"] = list(self.generator["required"])
        return block

    def block(self, definitions: dict) -> dict:
        """The JSON Schema of an entry of this kind: the role's common keys, included groups, own keys."""
        properties: dict = {self.role.discriminator: True}
        for group in (self.role.common, *self.include):
            properties.update(copy.deepcopy(definitions[group]["properties"]))
        properties.update(copy.deepcopy(self.properties))
        block = {"description": self.summary, "type": "object", "additionalProperties": False,
                 "properties": properties}
        if self.required:
            block["required"] = list(self.required)
        if self.all_of:
            block["allOf"] = copy.deepcopy(list(self.all_of))
        return block


def _fragment_error(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def read_fragment(path: Path) -> Fragment:
    """Parse and check one fragment file; a malformed one is a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise _fragment_error(path, f"not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise _fragment_error(path, "a fragment is a mapping")
    unknown = sorted(set(data) - FRAGMENT_KEYS)
    if unknown:
        raise _fragment_error(path, f"unknown key '{unknown[0]}' (known: {', '.join(sorted(FRAGMENT_KEYS))})")
    for key in ("kind", "role", "summary"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _fragment_error(path, f"'{key}' must be a non-empty string")
    if data["role"] not in ROLES:
        raise _fragment_error(path, f"role '{data['role']}' is not one of {', '.join(ROLES)}")
    capabilities = frozenset(data.get("capabilities") or ())
    if not capabilities <= set(CAPABILITIES):
        raise _fragment_error(path, f"unknown capability (known: {', '.join(CAPABILITIES)})")
    if not path.with_suffix(".py").is_file():
        raise _fragment_error(path, f"no module {path.with_suffix('.py').name} beside it")
    module = ".".join(("poisonflow", *path.relative_to(PACKAGE_DIR).with_suffix("").parts))
    return Fragment(
        kind=data["kind"], role=ROLES[data["role"]], module=module, path=path, summary=" ".join(data["summary"].split()),
        properties=data.get("properties") or {}, required=tuple(data.get("required") or ()),
        all_of=tuple(data.get("allOf") or ()), include=tuple(data.get("include") or ()),
        capabilities=capabilities, checks=data.get("checks") or {}, tiny=data.get("tiny") or {},
        generator=data.get("generator") or {}, split=tuple(data.get("split") or ()),
    )


@lru_cache(maxsize=None)
def fragments() -> tuple[Fragment, ...]:
    """Every fragment of the kind folders, in folder then file order; a duplicate kind is an error."""
    found: list[Fragment] = []
    seen: dict[tuple[str, str], Path] = {}
    for folder in FOLDERS:
        for path in sorted((PACKAGE_DIR / folder).glob("*.yaml")):
            fragment = read_fragment(path)
            slot = (fragment.role.section, fragment.kind)
            if slot in seen:
                raise _fragment_error(path, f"kind '{fragment.kind}' is also declared by {seen[slot]}")
            seen[slot] = path
            found.append(fragment)
    return tuple(found)


class Registry(BaseRegistry):
    """The kinds of one or more roles: config name → module, found from the fragments."""

    def __init__(self, *roles: str, what: str | None = None):
        self.roles = tuple(ROLES[name] for name in roles)
        super().__init__(what or self.roles[0].what, {})

    def fragments(self) -> dict[str, Fragment]:
        return {f.kind: f for f in fragments() if f.role in self.roles}

    def entries(self) -> dict[str, str]:
        return {kind: fragment.module for kind, fragment in self.fragments().items()}

    def fragment(self, name: str, key: str | None = None) -> Fragment:
        self.target(name, key)  # the unknown-kind message
        return self.fragments()[name]


# The attacks section holds both roles: an unknown kind lists them all.
ATTACKS = Registry("backdoor")
UNLEARNABLE = Registry("unlearnable")
ATTACK_KINDS = Registry("backdoor", "unlearnable", what="attack kind")
DEFENSES = Registry("defense")
SOURCES = Registry("source")


# -- the assembled schema ---------------------------------------------------------------------

@lru_cache(maxsize=1)
def base_schema() -> dict:
    return yaml.safe_load(BASE_SCHEMA.read_text())


def generator_settings(kind: str, spec: dict | None, key: str | None = None) -> dict:
    """A ``generators:`` entry of ``kind`` with its fragment's defaults filled and checked."""
    fragment = ATTACKS.fragment(kind, key=key)
    if not fragment.generator:
        raise ConfigError(f"{key or kind}.kind: attack kind '{kind}' trains no generator")
    definitions = config_schema()["$defs"]
    entry = {k: v for k, v in dict(spec or {}).items() if k not in RESOLVED_KEYS}
    entry.setdefault("kind", kind)
    filled = fill_and_check(entry, {"$defs": definitions, **fragment.generator_block(definitions)}, key or kind,
                            ignore=frozenset({"required"}))
    return {**filled, **{k: v for k, v in dict(spec or {}).items() if k in RESOLVED_KEYS}}


def kind_list(role_names: tuple[str, ...]) -> str:
    by_role = {name: sorted(f.kind for f in fragments() if f.role.name == name) for name in role_names}
    return "; ".join(f"{ROLES[name].heading.lower()}: {' | '.join(kinds)}" for name, kinds in by_role.items())


@lru_cache(maxsize=1)
def config_schema() -> dict:
    """The base schema with one ``if/then`` block per fragment in its definition's ``allOf``."""
    schema = copy.deepcopy(base_schema())
    definitions = schema["$defs"]
    for fragment in fragments():
        role = fragment.role
        target = definitions[role.definition]
        target["allOf"].append({"if": {"properties": {role.discriminator: {"const": fragment.kind}},
                                       "required": [role.discriminator]},
                                "then": fragment.block(definitions)})
    for fragment in fragments():
        if fragment.generator:
            definitions["generator"]["allOf"].append({
                "if": {"properties": {"kind": {"const": fragment.kind}}, "required": ["kind"]},
                "then": fragment.generator_block(definitions)})
    definitions["generator"]["properties"]["kind"]["description"] = " | ".join(
        sorted(f.kind for f in fragments() if f.generator)) or "no kind trains a generator"
    for definition in definitions.values():  # an empty allOf is not a valid schema
        if definition.get("allOf") == []:
            del definition["allOf"]
    for definition, role_names in (("attack", ("backdoor", "unlearnable")), ("defense", ("defense",)),
                                   ("dataset", ("source",))):
        discriminator = ROLES[role_names[0]].discriminator
        definitions[definition]["properties"][discriminator]["description"] = kind_list(role_names)
    return schema


# -- settings of one kind ---------------------------------------------------------------------

def _extend_with_defaults(validator_class):
    set_properties = validator_class.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if not isinstance(subschema, dict) or "default" not in subschema:
                    continue
                if name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
                elif isinstance(subschema["default"], dict) and isinstance(instance[name], dict):
                    merge_missing(instance[name], subschema["default"])  # a partial override keeps the rest
        yield from set_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties_with_defaults})


DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def merge_missing(target: dict, default: dict) -> None:
    """Fill ``target``'s missing keys from ``default``, nested mappings key by key: an entry that
    gives ``optimizer: {lr: 0.05}`` keeps the default optimizer's other settings."""
    for key, value in default.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(target[key], dict):
            merge_missing(target[key], value)


def key_of(path, prefix: str = "") -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(config)"


def error_message(error: jsonschema.ValidationError, prefix: str = "") -> str:
    # if/then errors nest the useful message; report the deepest one
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        if unknown:  # name the key itself, and what would have been accepted
            return f"{key_of([*error.absolute_path, unknown[0]], prefix)}: unknown key (known: {', '.join(known)})"
    return f"{key_of(error.absolute_path, prefix)}: {error.message}"


def fill_and_check(instance: Any, schema: dict, prefix: str = "", strict: bool = True,
                   ignore: frozenset = frozenset()) -> Any:
    """A copy of ``instance`` with the schema's defaults filled, or a ConfigError naming the key
    (``strict=False``: defaults only, errors ignored; ``ignore``: validators whose errors pass)."""
    instance = copy.deepcopy(instance)
    errors = sorted((e for e in DefaultFillingValidator(schema).iter_errors(instance) if e.validator not in ignore),
                    key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors and strict:
        raise ConfigError(error_message(errors[0], prefix))
    return instance


@lru_cache(maxsize=None)
def kind_schema(module: str) -> dict:
    """The entry schema of the kind implemented by ``module`` (with the base definitions for $ref)."""
    fragment = fragment_of(module)
    definitions = config_schema()["$defs"]
    return {"$defs": definitions, **fragment.block(definitions)}


def fragment_of(module: str) -> Fragment:
    for fragment in fragments():
        if fragment.module == module:
            return fragment
    raise ValueError(f"{module} has no schema fragment beside it")


def settings_for(module: str, spec: dict | None, key: str | None = None) -> dict:
    """An entry of the kind implemented by ``module`` with its fragment's defaults filled and
    checked. Pass the module's ``__name__``; ``key`` prefixes messages (default: the kind)."""
    fragment = fragment_of(module)
    entry = dict(spec or {})
    resolved = {name: entry.pop(name) for name in RESOLVED_KEYS if name in entry}
    entry.setdefault(fragment.role.discriminator, fragment.kind)
    # required keys name other config entries (a surrogate): the config's concern, not the module's
    return {**fill_and_check(entry, kind_schema(module), key or fragment.kind, ignore=frozenset({"required"})),
            **resolved}


def defaults_of(module: str) -> dict:
    """The kind's settings when an entry gives nothing but its kind (the role's common keys
    included; a required key without a default stays absent)."""
    fragment = fragment_of(module)
    return fill_and_check({fragment.role.discriminator: fragment.kind}, kind_schema(module), strict=False)


def definition_settings(name: str, value: dict | None, key: str) -> dict:
    """``value`` checked against the base schema's ``$defs/name`` with its defaults filled (for the
    building blocks that several kinds configure the same way, e.g. ``clipModel``)."""
    definitions = config_schema()["$defs"]
    return fill_and_check(dict(value or {}), {"$defs": definitions, **definitions[name]}, key)


def definition_defaults(name: str, placeholders: dict | None = None) -> dict:
    """The defaults of the base schema's ``$defs/name`` (``placeholders`` fill its required keys
    and are removed again): building blocks such as the trainer read their defaults from here."""
    filled = definition_settings(name, placeholders, name)
    return {key: value for key, value in filled.items() if key not in (placeholders or {})}
