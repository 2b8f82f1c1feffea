from setuptools import find_packages, setup


def extensions():
    """The C++ kernels in mmquant/ptq/csrc: BitSplit's coordinate-sweep inner loop and AdaRound's
    fused soft weight (BRECQ). Built against the installed torch (``pip install
    --no-build-isolation -e .``); without torch at build time they are skipped and the Python
    code computes the same results more slowly."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    args = ['-O3', '-std=c++20']                                  # torch >= 2.10 headers need C++20
    exts = [CppExtension('mmquant.ptq._bitsplit_sweep', ['mmquant/ptq/csrc/bitsplit_sweep.cpp'],
                         extra_compile_args=args),
            CppExtension('mmquant.ptq._adaround_soft', ['mmquant/ptq/csrc/adaround_soft.cpp'],
                         extra_compile_args=args + ['-fopenmp', '-ffast-math'] + simd_flags(),
                         extra_link_args=['-fopenmp'])]
    return exts, {'build_ext': BuildExtension}


def simd_flags():
    """-mavx2 -mfma when the machine building the extension has them (it is built where it runs:
    ``pip install -e .``), so the AdaRound kernel's loops use 8-lane vector math."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(next((line for line in f if line.startswith('flags')), '').split())
    except OSError:
        return []
    return ['-mavx2', '-mfma'] if {'avx2', 'fma'} <= flags else []


def read_version():
    ns = {}
    with open('mmquant/version.py') as f:
        exec(f.read(), ns)
    return ns['__version__']


EXT_MODULES, CMDCLASS = extensions()

setup(
    name='mmquant',
    version=read_version(),
    description='Neural-network quantization (PTQ, QAT, integer export) for OpenMMLab '
                'classifiers and detectors, by module swapping',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmquant', 'mmquant.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'numpy', 'scipy'],   # scipy: LAPQ's Powell search
    extras_require={
        'mm': ['mmengine==0.10.7', 'mmcv==2.1.0', 'mmpretrain==1.2.0', 'mmdet==3.3.0'],
        'export': ['onnx', 'onnxruntime'],
        'tests': ['pytest'],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    license='Apache-2.0',
)
