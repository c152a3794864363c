"""Drop-in replacements for other quantisation packages.

* :func:`quantize` / :func:`dequantize`: the ``distquant`` package's API (:mod:`.distquant`);
* :func:`quantitize`: the ``quantitizer`` package's product quantiser (:mod:`.quantitizer`).
"""

from .distquant import dequantize as dequantize
from .distquant import quantize as quantize
from .quantitizer import CompressionReport as CompressionReport
from .quantitizer import Quantitized as Quantitized
from .quantitizer import compression_report as compression_report
from .quantitizer import deep_sizeof as deep_sizeof
from .quantitizer import quantitize as quantitize
from .quantitizer import take_rows as take_rows
