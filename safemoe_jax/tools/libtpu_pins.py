"""libtpu for ahead-of-time TPU compilation (tools/aot.find_libtpu), pinned per jax version.

Each jax release's `tpu` extra names one libtpu series (jax's own METADATA: `Requires-Dist:
libtpu==0.0.N.*; extra == "tpu"`); pyproject.toml bounds jax to the versions listed here, so the
installed jax always has a pinned libtpu. To support a newer jax: add its series to JAX_LIBTPU, the
sha256 of each of that series' wheels (PyPI; `pip install --dry-run --report` shows them) to
LIBTPU_SHA256, and raise the bound in pyproject.toml (tests/test_bench.py checks the three agree).
"""

# jax version -> the libtpu series its `tpu` extra requires
JAX_LIBTPU = {"0.10.0": "0.0.40", "0.10.1": "0.0.41", "0.10.2": "0.0.42"}

# sha256 of each libtpu wheel (from PyPI) of those series; a download is checked against it before
# anything is extracted, and a libtpu not listed here is not downloaded (set TPU_LIBRARY_PATH, or
# pip install '.[tpu]').
LIBTPU_SHA256 = {
    "libtpu-0.0.40-cp311-cp311-manylinux_2_31_x86_64.whl":
        "35885715028faf6f60f96fedf95f7110c42f7685d20fddd8c31e741d29c1ddca",
    "libtpu-0.0.40-cp312-cp312-manylinux_2_31_x86_64.whl":
        "aa861000608ae4b8cc8f01728253ec2829532894dfccb691665bde79a7aa5f3c",
    "libtpu-0.0.40-cp313-cp313-manylinux_2_31_x86_64.whl":
        "c1a280a6d216131c1d81d30f0b3ca13428d0c06e6781ec88190aa2400198cefc",
    "libtpu-0.0.40-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "90803ebcccffd4206e7a52344583fec246deb83de95fbc7b5e0137e4ae480a35",
    "libtpu-0.0.40-cp314-cp314-manylinux_2_31_x86_64.whl":
        "cfa6bba0edb6092994b1769a3b4b30997406f30a76123ab9cc818443ac4d5e98",
    "libtpu-0.0.40-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "a1d01214bffe5a0910057014eaa17ed838eebc780e1538b4bd118684908ea120",
    "libtpu-0.0.41-cp311-cp311-manylinux_2_31_x86_64.whl":
        "62dd05e942de8f1379eff9a1b2ada33e1a99d0fbddf52ffce57b18268a0413e6",
    "libtpu-0.0.41-cp312-cp312-manylinux_2_31_x86_64.whl":
        "47feeac3cd4cd88c58342c20f3cb3635d1f2d53f8689aa24bbe9690e664629de",
    "libtpu-0.0.41-cp313-cp313-manylinux_2_31_x86_64.whl":
        "5dd67e594cefb67f4272efb5a3fa38cf9206b7dd1ab5fbd559001809f8b9dddb",
    "libtpu-0.0.41-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "ca9dd60976c035b071b2d5d61acdd78598f717bba4f277b3708269d05b5c32fb",
    "libtpu-0.0.41-cp314-cp314-manylinux_2_31_x86_64.whl":
        "5c2776bffaac0acd0376e8c4a40981f5fcdbe71da067fe50da150eee51958efc",
    "libtpu-0.0.41-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "49df53647fead6188b7f1a8d3bfc7e0fb664f30b445bba5a672b1e3fff777f02",
    "libtpu-0.0.42-cp311-cp311-manylinux_2_31_x86_64.whl":
        "8f6608bf5ebb563be990c61783c8d541671a5c9cd6c1f2bd53145c3f0afa18cc",
    "libtpu-0.0.42-cp312-cp312-manylinux_2_31_x86_64.whl":
        "eecac4f4d364fa815d3124b42e682d924601828e82363c2a940c30c725b3f6fb",
    "libtpu-0.0.42-cp313-cp313-manylinux_2_31_x86_64.whl":
        "eb00bfb17125a22905533a60743622dad2df32a0288dab5367fca66a2ee9c38f",
    "libtpu-0.0.42-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "4f4e5b332aa6c3d23f7edc6eb1a93c4a0c066f9a8b9f6d9cd77cab5b99ac9bff",
    "libtpu-0.0.42-cp314-cp314-manylinux_2_31_x86_64.whl":
        "377fb47ba539ec3fb2644c8266d928f8005d377cb02ca7db7617c04a4c682377",
    "libtpu-0.0.42-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "983a8531ca317bd97ed6fc85ddc30b40347448a0bec24a6f633d55dfda0b3ed5",
    "libtpu-0.0.42.1-cp311-cp311-manylinux_2_31_x86_64.whl":
        "4d9975c446f594b0b517510b3db2fc9df65acd9a08f253c638fff5eb6bce163e",
    "libtpu-0.0.42.1-cp312-cp312-manylinux_2_31_x86_64.whl":
        "4026b215b42bca07331aac91d31659394b128b19df848aa6449b30fe16b335a6",
    "libtpu-0.0.42.1-cp313-cp313-manylinux_2_31_x86_64.whl":
        "32f216b88cf04d3b82693378e5612bd23e3b8b88afc72546561830284a2b0091",
    "libtpu-0.0.42.1-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "38c984c89aab1e6e49588ad9f8fd902d67a775c7ce08948909fdaa7686d16efc",
    "libtpu-0.0.42.1-cp314-cp314-manylinux_2_31_x86_64.whl":
        "bffd6bf3944473e394cbed1d7f0875e7b338e3f8d278bfd8687c7450724b1e47",
    "libtpu-0.0.42.1-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "1149f6852e08f97c76572ed8e5064131e384a5e5f72fbe2dabb9c807134a3e3f",
}
