"""Twenty JSON schemas for grammar-constrained output: the shapes structured output meets.

Strings and arrays carry length caps so that a tiny base model, which may never choose to close a
string, still finishes within a short reply. Each case is (name, schema or Pydantic class, prompt).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

Short = Annotated[str, Field(max_length=16)]


class Address(BaseModel):
    street: Short
    city: Short
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    """A customer with a postal address."""

    name: Short
    address: Address


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Shirt(BaseModel):
    color: Color
    size: Literal["S", "M", "L", "XL"]
    price: float = Field(ge=0, le=500)


class Profile(BaseModel):
    username: Short
    nickname: Short | None = None
    age: int | None = Field(default=None, ge=13, le=120)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]


class Meeting(BaseModel):
    title: Short
    day: dt.date
    starts: dt.datetime


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{4}$")
    quantity: int = Field(gt=0, lt=100)


class Order(BaseModel):
    """An order of at most three items, with a priority."""

    items: list[Item] = Field(min_length=1, max_length=3)
    priority: Literal["low", "normal", "high"] = "normal"
    gift: bool = False


CASES: list[tuple[str, Any, str]] = [
    (
        "flat object",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer"},
                "active": {"type": "boolean"},
            },
            "required": ["name", "age", "active"],
        },
        "A user record.",
    ),
    ("nested objects (Pydantic)", Customer, "A customer in Paris."),
    (
        "array of strings",
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["tags"],
        },
        "Tags for a photo of a beach.",
    ),
    (
        "array of objects",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "label": {"type": "string", "maxLength": 10},
                },
                "required": ["id", "label"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "Two labelled items.",
    ),
    ("enums (Pydantic)", Shirt, "A shirt for sale."),
    ("optional fields (Pydantic)", Profile, "A user profile."),
    (
        "number bounds",
        {
            "type": "object",
            "properties": {
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "celsius": {"type": "number", "exclusiveMinimum": -50, "maximum": 50},
                "latitude": {"type": "number", "minimum": -90, "maximum": 90},
            },
            "required": ["score", "celsius", "latitude"],
        },
        "A weather reading.",
    ),
    (
        "integer bounds with negatives",
        {
            "type": "object",
            "properties": {
                "offset": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            },
            "required": ["offset", "year"],
        },
        "A time zone offset and a year.",
    ),
    (
        "string patterns",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"},
                "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                "word": {"type": "string", "pattern": "^(yes|no|maybe)$"},
            },
            "required": ["code", "hex", "word"],
        },
        "A product code, a colour and an answer.",
    ),
    (
        "pattern with groups and alternation",
        {
            "type": "object",
            "properties": {
                "phone": {"type": "string", "pattern": r"^(\+33|0)[1-9]( ?[0-9]{2}){4}$"}
            },
            "required": ["phone"],
        },
        "A French phone number.",
    ),
    (
        "const",
        {
            "type": "object",
            "properties": {
                "schema_version": {"const": 2},
                "kind": {"const": "event"},
                "name": {"type": "string", "maxLength": 16},
            },
            "required": ["schema_version", "kind", "name"],
        },
        "An event.",
    ),
    ("discriminated union (Pydantic)", Pet, "A pet."),
    (
        "anyOf of types",
        {
            "type": "object",
            "properties": {
                "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]}
            },
            "required": ["value"],
        },
        "A value.",
    ),
    ("date and date-time (Pydantic)", Meeting, "A meeting next week."),
    (
        "uuid",
        {
            "type": "object",
            "properties": {"id": {"type": "string", "format": "uuid"}},
            "required": ["id"],
        },
        "A record id.",
    ),
    (
        "tuple",
        {
            "type": "object",
            "properties": {
                "point": {
                    "type": "array",
                    "prefixItems": [
                        {"type": "number", "minimum": -90, "maximum": 90},
                        {"type": "number", "minimum": -180, "maximum": 180},
                    ],
                    "items": False,
                }
            },
            "required": ["point"],
        },
        "The coordinates of Paris.",
    ),
    (
        "nullable type list",
        {
            "type": "object",
            "properties": {
                "middle_name": {"type": ["string", "null"], "maxLength": 8},
                "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
            },
            "required": ["middle_name", "count"],
        },
        "A person without a middle name.",
    ),
    (
        "recursive tree",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 8},
                        "children": {
                            "type": "array",
                            "items": {"$ref": "#/$defs/node"},
                            "maxItems": 2,
                        },
                    },
                    "required": ["name", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
        "A small family tree.",
    ),
    (
        "enum values that need escaping",
        {
            "type": "object",
            "properties": {
                "greeting": {"enum": ['say "hi"', "café", "back\\slash", None, 3]},
                "note": {"type": "string", "maxLength": 6},
            },
            "required": ["greeting"],
            "additionalProperties": False,
        },
        "A greeting.",
    ),
    ("nested list of models (Pydantic)", Order, "An order for two books."),
]
