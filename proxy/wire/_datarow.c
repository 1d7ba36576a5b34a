/*
 * The values of a DataRow message body, in C: a federated SELECT reads every row it merges
 * (sort keys, aggregates), and this split is most of that cost in Python (2 us a row here,
 * 0.2 us in C). proxy/wire/messages.py uses it when it is built and its own code when not;
 * the tests hold the two equal, malformed bodies included.
 *
 * keyed_rows() goes one step further for an ORDER BY merge: it frames a run of DataRow
 * messages and reads each row's sort key, the work the merge does for every row it
 * receives (6 us a row in Python, under 1 us here). Its Python twin is
 * proxy/wire/messages.py python_keyed_rows, which documents the key.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int32_t
read_i32(const unsigned char *p)
{
    return (int32_t) (((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | (uint32_t) p[3]);
}

/* fields(body) -> list of bytes or None; ValueError if the body is not a whole DataRow. */
static PyObject *
fields(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    const unsigned char *data;
    Py_ssize_t size, pos = 2, i;
    int count;
    PyObject *out = NULL;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    data = (const unsigned char *) view.buf;
    size = view.len;
    if (size < 2)
        goto malformed;
    count = (int16_t) (((uint16_t) data[0] << 8) | data[1]);
    if (count < 0)
        goto malformed;
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (i = 0; i < count; i++) {
        int32_t length;
        PyObject *value;

        if (size - pos < 4)
            goto malformed;
        length = read_i32(data + pos);
        pos += 4;
        if (length < 0) {
            Py_INCREF(Py_None);
            value = Py_None;
        } else {
            if (size - pos < length)
                goto malformed;
            value = PyBytes_FromStringAndSize((const char *) data + pos, length);
            if (value == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            pos += length;
        }
        PyList_SET_ITEM(out, i, value);
    }
    goto done;

malformed:
    Py_CLEAR(out);
    PyErr_SetString(PyExc_ValueError, "malformed DataRow: a value runs past the end of the message");
done:
    PyBuffer_Release(&view);
    return out;
}

enum { KEY_CALL, KEY_INT, KEY_INT_DESC, KEY_FLOAT, KEY_FLOAT_DESC, KEY_BYTES };

typedef struct {
    Py_ssize_t column;
    int mode;
    int nulls_first;
    PyObject *read; /* borrowed from the spec */
} sort_column;

/* A number's text as PostgreSQL sends it, NUL-terminated for the C parsers. */
static int
copy_text(char *out, size_t room, const unsigned char *p, int32_t length)
{
    if (length <= 0 || (size_t) length >= room) {
        PyErr_SetString(PyExc_ValueError, "malformed DataRow: a numeric sort key is empty or too long");
        return -1;
    }
    memcpy(out, p, (size_t) length);
    out[length] = '\0';
    return 0;
}

/* The (flag, value) pair one column adds to a row's key; see python_keyed_rows. */
static int
key_pair(PyObject *key, Py_ssize_t at, const sort_column *c, const unsigned char *p, int32_t length)
{
    PyObject *flag, *value;
    char text[400];
    long flag_value = 1;

    if (length < 0) {
        flag_value = c->nulls_first ? 0 : 3;
        value = PyLong_FromLong(0);
    } else if (c->mode == KEY_INT || c->mode == KEY_INT_DESC) {
        char *end;
        if (copy_text(text, sizeof text, p, length) < 0)
            return -1;
        value = PyLong_FromString(text, &end, 10);
        if (value != NULL && *end != '\0') {
            Py_DECREF(value);
            PyErr_SetString(PyExc_ValueError, "malformed DataRow: an integer sort key is not a number");
            return -1;
        }
        if (value != NULL && c->mode == KEY_INT_DESC)
            Py_SETREF(value, PyNumber_Negative(value));
    } else if (c->mode == KEY_FLOAT || c->mode == KEY_FLOAT_DESC) {
        char *end;
        double d;
        if (copy_text(text, sizeof text, p, length) < 0)
            return -1;
        d = PyOS_string_to_double(text, &end, NULL);
        if (d == -1.0 && PyErr_Occurred())
            return -1;
        if (*end != '\0') {
            PyErr_SetString(PyExc_ValueError, "malformed DataRow: a float sort key is not a number");
            return -1;
        }
        if (Py_IS_NAN(d)) {  /* NaN sorts above every number: after them ascending, before descending */
            flag_value = c->mode == KEY_FLOAT ? 2 : 1;
            d = 0.0;
        } else if (c->mode == KEY_FLOAT_DESC) {
            flag_value = 2;
            d = -d;
        }
        value = PyFloat_FromDouble(d);
    } else {
        value = PyBytes_FromStringAndSize((const char *) p, length);
        if (value != NULL && c->mode == KEY_CALL)
            Py_SETREF(value, PyObject_CallOneArg(c->read, value));
    }
    if (value == NULL)
        return -1;
    flag = PyLong_FromLong(flag_value);
    if (flag == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyTuple_SET_ITEM(key, at, flag);
    PyTuple_SET_ITEM(key, at + 1, value);
    return 0;
}

/* keyed_rows(buffer, pos, spec) -> ([(key, message), ...], new_pos)
 *
 * Reads the whole DataRow messages of buffer from pos on, up to the first other message
 * or the first incomplete one. spec is a tuple of (column, mode, read, nulls_first). */
static PyObject *
keyed_rows(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, size, nkeys, k;
    PyObject *spec, *rows = NULL, *result = NULL;
    sort_column columns[32];
    const unsigned char *data;

    if (!PyArg_ParseTuple(args, "y*nO!", &view, &pos, &PyTuple_Type, &spec))
        return NULL;
    nkeys = PyTuple_GET_SIZE(spec);
    if (nkeys > 32) {
        PyErr_SetString(PyExc_ValueError, "more than 32 sort keys");
        goto done;
    }
    for (k = 0; k < nkeys; k++) {
        PyObject *item = PyTuple_GET_ITEM(spec, k);
        if (!PyArg_ParseTuple(item, "niOp", &columns[k].column, &columns[k].mode, &columns[k].read,
                              &columns[k].nulls_first))
            goto done;
    }
    rows = PyList_New(0);
    if (rows == NULL)
        goto done;
    data = (const unsigned char *) view.buf;
    size = view.len;
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        goto done;
    }
    while (size - pos >= 5 && data[pos] == 'D') {
        int32_t length = read_i32(data + pos + 1);
        const unsigned char *body = data + pos + 5;
        Py_ssize_t end, body_size;
        int count, field;
        PyObject *key, *message, *row;

        if (length < 4)
            goto malformed;
        end = pos + 1 + (Py_ssize_t) length;
        if (end > size)
            break;
        body_size = length - 4;
        if (body_size < 2)
            goto malformed;
        count = (int16_t) (((uint16_t) body[0] << 8) | body[1]);
        key = PyTuple_New(2 * nkeys);
        if (key == NULL)
            goto done;
        for (k = 0; k < nkeys; k++) {
            /* The columns are few: walk to each from the start (sort keys are usually first or last). */
            Py_ssize_t want = columns[k].column, p = 2;
            int32_t vlen = -1;
            if (want < 0 || want >= count) {
                Py_DECREF(key);
                goto malformed;
            }
            for (field = 0; field <= want; field++) {
                if (body_size - p < 4) {
                    Py_DECREF(key);
                    goto malformed;
                }
                vlen = read_i32(body + p);
                p += 4;
                if (vlen > 0) {
                    if (body_size - p < vlen) {
                        Py_DECREF(key);
                        goto malformed;
                    }
                    if (field < want)
                        p += vlen;
                }
            }
            if (key_pair(key, 2 * k, &columns[k], body + p, vlen) < 0) {
                Py_DECREF(key);
                goto done;
            }
        }
        message = PyBytes_FromStringAndSize((const char *) data + pos, end - pos);
        if (message == NULL) {
            Py_DECREF(key);
            goto done;
        }
        row = PyTuple_Pack(2, key, message);
        Py_DECREF(key);
        Py_DECREF(message);
        if (row == NULL || PyList_Append(rows, row) < 0) {
            Py_XDECREF(row);
            goto done;
        }
        Py_DECREF(row);
        pos = end;
    }
    result = Py_BuildValue("(On)", rows, pos);
    goto done;

malformed:
    PyErr_SetString(PyExc_ValueError, "malformed DataRow: a value runs past the end of the message");
done:
    Py_XDECREF(rows);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"fields", fields, METH_O, "The values of a DataRow body (None for NULL)."},
    {"keyed_rows", keyed_rows, METH_VARARGS, "The DataRows of a buffer from pos on, each with its sort key."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.wire._datarow", "DataRow values, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__datarow(void)
{
    return PyModule_Create(&module);
}
