from setuptools import setup

with open("README.rst", encoding="utf-8") as readme:
    long_description = readme.read()

version = {}
with open("joblib_store.py", encoding="utf-8") as module:
    for line in module:
        if line.startswith("__version__"):
            exec(line, version)
            break

setup(
    name="joblib-store",
    version=version["__version__"],
    description="joblib.Memory caches in Amazon S3 and S3-compatible object stores",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    py_modules=["joblib_store"],
    python_requires=">=3.10",
    install_requires=["joblib>=1.2", "s3fs>=2023.4.0"],
    extras_require={
        "test": ["pytest", "moto[server]", "numpy", "dask[distributed]"],
        "demo": ["moto[server]", "numpy"],
    },
    classifiers=[
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
