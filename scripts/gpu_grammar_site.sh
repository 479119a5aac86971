# Sourced by the GPU scripts that need structured outputs: installs xgrammar and what it and the
# tests import, which the GPU machine lacks (apache-tvm-ffi, pydantic's set, jsonschema's set),
# from the wheels in $WHEELS into the folder $SITE, for PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/xgrammar-*.whl "$WHEELS"/apache_tvm_ffi-*.whl \
    "$WHEELS"/jsonschema*.whl "$WHEELS"/referencing-*.whl "$WHEELS"/rpds_py-*.whl "$WHEELS"/attrs-*.whl \
    "$WHEELS"/pydantic-*.whl "$WHEELS"/pydantic_core-*.whl "$WHEELS"/annotated_types-*.whl "$WHEELS"/typing_inspection-*.whl \
    "$WHEELS"/typing_extensions-*.whl 2>&1 | tail -2
