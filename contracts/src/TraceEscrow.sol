// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Escrow of TRACE between a buyer and a seller
/// @notice A buyer funds an escrow under an id chosen off chain. The platform's arbiters release it to the
///         seller (less a fee) or refund it to the buyer, in parts, until it is exhausted. If the platform
///         goes away, the buyer alone may take back what remains once the deadline plus a grace period has
///         passed; an arbiter holds that off during a dispute by extending the deadline.
/// @dev Every state change happens before the token is called (checks-effects-interactions), and every
///      function that moves tokens is also `nonReentrant`.
contract TraceEscrow is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant ARBITER_ROLE = keccak256("ARBITER_ROLE");

    /// @notice An escrow as the views return it.
    struct Escrow {
        address buyer;
        address seller;
        uint256 funded;
        uint256 remaining;
        uint64 deadline;
    }

    /// @dev Storage layout of an escrow: buyer and deadline share a slot.
    struct EscrowRecord {
        address buyer;
        uint64 deadline;
        address seller;
        uint256 funded;
        uint256 remaining;
    }

    IERC20 private immutable _token;
    uint64 private immutable _graceSeconds;
    address private _feeRecipient;
    mapping(bytes32 id => EscrowRecord) private _escrows;

    event Funded(bytes32 indexed id, address indexed buyer, address indexed seller, uint256 amount, uint64 deadline);
    event Released(bytes32 indexed id, address indexed seller, uint256 toSeller, uint256 fee, uint256 remaining);
    event Refunded(bytes32 indexed id, address indexed buyer, uint256 amount, uint256 remaining, bool byBuyer);
    event DeadlineExtended(bytes32 indexed id, uint64 deadline);
    event FeeRecipientSet(address indexed previousRecipient, address indexed newRecipient);

    error ZeroAddress();
    error ZeroAmount();
    error EscrowExists(bytes32 id);
    error UnknownEscrow(bytes32 id);
    error DeadlineNotInFuture(uint64 deadline, uint256 blockTimestamp);
    error DeadlineNotExtended(bytes32 id, uint64 currentDeadline, uint64 requestedDeadline);
    error AmountExceedsRemaining(bytes32 id, uint256 requested, uint256 remaining);
    error RefundNotYetAllowed(bytes32 id, uint256 allowedAt);
    /// @notice The token moved a different amount than asked (fee-on-transfer or rebasing tokens are refused).
    error TransferAmountMismatch(uint256 expected, uint256 received);

    constructor(IERC20 token_, address admin, address feeRecipient_, uint64 graceSeconds_) {
        if (address(token_) == address(0) || admin == address(0) || feeRecipient_ == address(0)) {
            revert ZeroAddress();
        }
        _token = token_;
        _graceSeconds = graceSeconds_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _feeRecipient = feeRecipient_;
        emit FeeRecipientSet(address(0), feeRecipient_);
    }

    /// @notice Opens escrow `id`: pulls `amount` from the caller (the buyer), who must have approved it.
    function fund(bytes32 id, address seller, uint256 amount, uint64 deadline) external nonReentrant {
        if (_escrows[id].buyer != address(0)) revert EscrowExists(id);
        if (seller == address(0)) revert ZeroAddress();
        if (amount == 0) revert ZeroAmount();
        if (deadline <= block.timestamp) revert DeadlineNotInFuture(deadline, block.timestamp);

        _escrows[id] = EscrowRecord({
            buyer: msg.sender, deadline: deadline, seller: seller, funded: amount, remaining: amount
        });
        emit Funded(id, msg.sender, seller, amount, deadline);

        uint256 balanceBefore = _token.balanceOf(address(this));
        _token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = _token.balanceOf(address(this)) - balanceBefore;
        if (received != amount) revert TransferAmountMismatch(amount, received);
    }

    /// @notice Pays `toSeller` to the seller and `fee` to the fee recipient out of what remains in escrow `id`.
    function release(bytes32 id, uint256 toSeller, uint256 fee) external nonReentrant onlyRole(ARBITER_ROLE) {
        EscrowRecord storage escrow = _existing(id);
        uint256 total = toSeller + fee;
        if (total == 0) revert ZeroAmount();
        uint256 remaining = escrow.remaining;
        if (total > remaining) revert AmountExceedsRemaining(id, total, remaining);

        remaining -= total;
        escrow.remaining = remaining;
        address seller = escrow.seller;
        address feeRecipient_ = _feeRecipient;
        emit Released(id, seller, toSeller, fee, remaining);

        if (toSeller > 0) _token.safeTransfer(seller, toSeller);
        if (fee > 0) _token.safeTransfer(feeRecipient_, fee);
    }

    /// @notice Returns `amount` of escrow `id` to its buyer. An arbiter may do so at any time; the buyer
    ///         alone once `deadline + graceSeconds` has been reached.
    function refund(bytes32 id, uint256 amount) external nonReentrant {
        EscrowRecord storage escrow = _existing(id);
        address buyer = escrow.buyer;
        bool byArbiter = hasRole(ARBITER_ROLE, msg.sender);
        if (!byArbiter) {
            if (msg.sender != buyer) revert AccessControlUnauthorizedAccount(msg.sender, ARBITER_ROLE);
            uint256 allowedAt = uint256(escrow.deadline) + _graceSeconds;
            if (block.timestamp < allowedAt) revert RefundNotYetAllowed(id, allowedAt);
        }
        if (amount == 0) revert ZeroAmount();
        uint256 remaining = escrow.remaining;
        if (amount > remaining) revert AmountExceedsRemaining(id, amount, remaining);

        remaining -= amount;
        escrow.remaining = remaining;
        emit Refunded(id, buyer, amount, remaining, !byArbiter);

        _token.safeTransfer(buyer, amount);
    }

    /// @notice Moves the deadline of escrow `id` later (never earlier), which postpones the buyer's own refund.
    function extendDeadline(bytes32 id, uint64 newDeadline) external onlyRole(ARBITER_ROLE) {
        EscrowRecord storage escrow = _existing(id);
        uint64 current = escrow.deadline;
        if (newDeadline <= current) revert DeadlineNotExtended(id, current, newDeadline);
        escrow.deadline = newDeadline;
        emit DeadlineExtended(id, newDeadline);
    }

    /// @notice Sets the account that receives release fees from now on.
    function setFeeRecipient(address newRecipient) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (newRecipient == address(0)) revert ZeroAddress();
        address previous = _feeRecipient;
        _feeRecipient = newRecipient;
        emit FeeRecipientSet(previous, newRecipient);
    }

    /// @notice Escrow `id` field by field; all zero when no such escrow was funded.
    function escrows(bytes32 id)
        external
        view
        returns (address buyer, address seller, uint256 funded, uint256 remaining, uint64 deadline)
    {
        EscrowRecord storage escrow = _escrows[id];
        return (escrow.buyer, escrow.seller, escrow.funded, escrow.remaining, escrow.deadline);
    }

    /// @notice Escrow `id` as a struct; all zero when no such escrow was funded.
    function getEscrow(bytes32 id) external view returns (Escrow memory) {
        EscrowRecord storage escrow = _escrows[id];
        return Escrow({
            buyer: escrow.buyer,
            seller: escrow.seller,
            funded: escrow.funded,
            remaining: escrow.remaining,
            deadline: escrow.deadline
        });
    }

    function token() external view returns (IERC20) {
        return _token;
    }

    function graceSeconds() external view returns (uint64) {
        return _graceSeconds;
    }

    function feeRecipient() external view returns (address) {
        return _feeRecipient;
    }

    function _existing(bytes32 id) private view returns (EscrowRecord storage escrow) {
        escrow = _escrows[id];
        if (escrow.buyer == address(0)) revert UnknownEscrow(id);
    }
}
