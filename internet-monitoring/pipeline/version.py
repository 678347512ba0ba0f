"""Schema and software versions spoken by this package.

`PIPELINE_SCHEMA_VERSION` is semantic: any peer with the same major is compatible
(protocol.md section 4). Keep it in step with the `.proto` files and the JSON codecs.
"""

PIPELINE_SCHEMA_VERSION = "1.0.0"
SUPPORTED_SCHEMA_MAJOR = 1
SOFTWARE_VERSION = "0.1.0"
