"""Tests of fsrecrypt.format: header, frames, random access, vectors, interop."""
