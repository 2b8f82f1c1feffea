from setuptools import find_packages, setup


def read_version():
    ns = {}
    with open('mmquant/version.py') as f:
        exec(f.read(), ns)
    return ns['__version__']


setup(
    name='mmquant',
    version=read_version(),
    description='Neural-network quantization (PTQ, QAT, integer export) for OpenMMLab '
                'classifiers and detectors, by module swapping',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmquant', 'mmquant.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'numpy'],
    extras_require={
        'mm': ['mmengine==0.10.7', 'mmcv==2.1.0', 'mmpretrain==1.2.0', 'mmdet==3.3.0'],
        'export': ['onnx', 'onnxruntime'],
        'tests': ['pytest'],
    },
    license='Apache-2.0',
)
