"""Drop-in replacements for other quantisation packages.

* :func:`quantize` / :func:`dequantize`: the ``distquant`` package's API (:mod:`.distquant`);
* :func:`quantitize`: the ``quantitizer`` package's product quantiser (:mod:`.quantitize`).
"""

from .distquant import dequantize as dequantize
from .distquant import quantize as quantize
from .quantitize import CompressionReport as CompressionReport
from .quantitize import Quantitized as Quantitized
from .quantitize import compression_report as compression_report
from .quantitize import deep_sizeof as deep_sizeof
from .quantitize import quantitize as quantitize
from .quantitize import take_rows as take_rows
